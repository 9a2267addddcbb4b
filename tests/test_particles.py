"""The particle (sequential Monte Carlo) inpainting sampler and the cache reordering it needs."""
import torch

from brainvq.inference.sampling import _SamplingCache, sample, sample_particles
from modules import PixelCNN, PriorConfig, bits
from priors import random_prior


def _square_holes(n: int) -> torch.Tensor:
    grid = torch.randint(24, (n, 8, 8), generator=torch.Generator().manual_seed(1))
    grid[:, 2:5, 2:5] = -1
    return grid


def test_one_particle_is_the_raster_sampler():
    model = random_prior()
    grid = _square_holes(3)
    grid[0, 7, 6] = -1  # a lone hole after the square, in one grid only
    ours = sample_particles(model, grid, 1, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(ours, sample(model, grid, 1.0, torch.Generator().manual_seed(5)))
    conditioned = random_prior(grid_size=8, slice_bins=5)
    where = torch.tensor([0.1, float("nan"), 0.9])
    ours = sample_particles(conditioned, grid, 1, 1.0, torch.Generator().manual_seed(5), where)
    assert torch.equal(ours, sample(conditioned, grid, 1.0, torch.Generator().manual_seed(5),
                                    positions=where))


def test_particles_keep_the_given_codes_and_fill_every_hole():
    grid = _square_holes(2)
    out = sample_particles(random_prior(), grid, 5, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (10, 8, 8) and (out >= 0).all()
    given = (grid != -1).repeat_interleave(5, 0)
    assert torch.equal(out[given], grid.repeat_interleave(5, 0)[given])


def test_a_reordered_cache_still_gives_the_forward_pass_logits():
    model = random_prior()
    grid = torch.randint(24, (4, 8, 8), generator=torch.Generator().manual_seed(2))
    original = grid.clone()
    with torch.inference_mode():
        cache = _SamplingCache(model, grid, first_row=3)
        cache.start_row(3)
        for c in range(4):
            cache.advance(c)
        order = torch.tensor([2, 2, 0, 1])
        cache.reorder(order)
        after_reorder = cache.logits(cache.advance(4))
        for c in range(5, 8):
            cache.advance(c)
        cache.finish_row(3)
        cache.start_row(4)
        next_row = cache.logits(cache.advance(0))
    assert torch.equal(grid, original[order])
    full = model(grid)
    torch.testing.assert_close(after_reorder, full[:, :, 3, 4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(next_row, full[:, :, 4, 0], rtol=1e-4, atol=1e-5)


STEPS = 100


def _row_copying_prior() -> PixelCNN:
    """A prior trained on grids whose rows each repeat one random code: a row's first site is
    anyone's guess, every later one copies its left neighbour."""
    torch.manual_seed(0)
    model = PixelCNN(PriorConfig(n_codes=8, channels=8, dilations=(1, 2, 1)))
    optimiser = torch.optim.Adam(model.parameters(), 2e-2)
    data = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        grids = torch.randint(8, (16, 8, 1), generator=data).expand(16, 8, 8)
        loss = bits(model(grids), grids, "mean")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_particles_follow_the_context_after_the_hole():
    # Holes over the left part of three rows: raster order must guess each row's code, and the
    # given codes right of the hole then disagree with most guesses; particles resampled by
    # those given codes agree with them.
    model = _row_copying_prior()
    grid = torch.randint(8, (4, 8, 1), generator=torch.Generator().manual_seed(1)).expand(
        4, 8, 8).clone()
    grid[:, 2:5, :5] = -1
    right = torch.zeros(8, 8, dtype=torch.bool)
    right[2:5, 5:] = True
    raster = sample(model, grid.repeat_interleave(16, 0), 1.0, torch.Generator().manual_seed(0))
    particles = sample_particles(model, grid, 16, 1.0, torch.Generator().manual_seed(0))

    def bits_right_of_the_hole(grids):
        with torch.no_grad():
            return bits(model(grids), grids)[:, right].mean().item()

    assert bits_right_of_the_hole(particles) < bits_right_of_the_hole(raster) - 3
    truth = grid[:, :, 7:].expand(4, 8, 8).repeat_interleave(16, 0)
    holes = (grid == -1).repeat_interleave(16, 0)
    right_codes = {name: (fills == truth)[holes].float().mean().item()
                   for name, fills in (("particles", particles), ("raster", raster))}
    assert right_codes["particles"] > right_codes["raster"] + 0.2
