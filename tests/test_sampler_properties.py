"""What the samplers must do where the fast-equals-naive checks do not look: the cache starting
below row 0, the particles' weights (the tempered probabilities of the given codes passed),
resampling exactly when the effective sample size falls below half the particles, holes that
reach the last column, and the indices the samplers accept."""
import pytest
import torch

from brainvq.inference import sampling
from brainvq.inference.sampling import (
    check_sample_input,
    inverse_cdf,
    nucleus,
    sample,
    sample_cached,
    sample_particles,
)
from priors import random_prior


def test_the_cache_starts_right_when_the_first_hole_is_in_row_one():
    model = random_prior(dilations=(1, 2, 1))
    grid = torch.randint(24, (2, 6, 6), generator=torch.Generator().manual_seed(0))
    grid[:, 1:3, 2:5] = -1
    out, logits = sample_cached(model, grid.clone(), 1.0, torch.Generator().manual_seed(1))
    sampled = (grid == -1).any(0).expand_as(grid)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1)[sampled],
                               model(out).permute(0, 2, 3, 1)[sampled], rtol=1e-4, atol=1e-5)
    naive = sample(model, grid, 1.0, torch.Generator().manual_seed(1), method="naive")
    assert torch.equal(out, naive)


def test_particle_weights_are_the_tempered_log_probabilities_of_the_given_codes(monkeypatch):
    model = random_prior(sharpness=3.0)
    grid = torch.randint(24, (2, 6, 7), generator=torch.Generator().manual_seed(3))
    grid[:, 2:4, 3:6] = -1  # three given sites weigh the particles before the first hole
    seen = []
    resample = sampling._resample
    monkeypatch.setattr(sampling, "_resample",
                        lambda cache, w, *rest: (seen.append(w.clone()), resample(cache, w, *rest)))
    sample_particles(model, grid, 2, 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_p = torch.log_softmax(model(grid.clamp(min=0)).double() / 0.5, dim=1)
    given = log_p[:, :, 2, :3].gather(1, grid[:, None, 2, :3]).sum((1, 2))
    torch.testing.assert_close(seen[0], given.repeat_interleave(2), rtol=1e-5, atol=1e-4)


class _Reorders:
    """A stand-in for the cache: records the order `_resample` asks for."""
    order = None

    def reorder(self, order: torch.Tensor) -> None:
        self.order = order.clone()


def test_a_grid_is_resampled_when_its_effective_sample_size_falls_below_half():
    weights = torch.tensor([[0.7, 0.1, 0.1, 0.1],  # ESS 1.92 < 2: resampled
                            [0.5, 0.5, 0.0, 0.0],  # ESS exactly 2: kept
                            [0.0, 0.0, 0.0, 1.0],  # ESS 1: every particle becomes the last
                            [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)  # ESS 4: kept
    log_weights = weights.log().flatten()
    cache = _Reorders()
    sampling._resample(cache, log_weights, 4, torch.Generator().manual_seed(0))
    order = cache.order.view(4, 4)
    assert ((order[0] >= 0) & (order[0] < 4)).all()
    assert order[1].tolist() == [4, 5, 6, 7] and order[3].tolist() == [12, 13, 14, 15]
    assert order[2].tolist() == [11, 11, 11, 11]
    kept = log_weights.view(4, 4)
    assert torch.count_nonzero(kept[[0, 2]]) == 0  # resampled grids weigh their particles alike
    assert torch.equal(kept[[1, 3]], weights[[1, 3]].log())


def test_no_grid_spent_means_no_reordering():
    cache = _Reorders()
    log_weights = torch.zeros(8, dtype=torch.float64)
    sampling._resample(cache, log_weights, 4, torch.Generator().manual_seed(0))
    assert cache.order is None


def test_particles_fill_holes_that_reach_the_last_column():
    model = random_prior()
    grid = torch.randint(24, (2, 6, 6), generator=torch.Generator().manual_seed(4))
    grid[:, 2:4, 3:] = -1
    out = sample_particles(model, grid, 3, 1.0, torch.Generator().manual_seed(0))
    given = (grid != -1).repeat_interleave(3, 0)
    assert (out >= 0).all() and torch.equal(out[given], grid.repeat_interleave(3, 0)[given])


def _reverse_every_grid(cache, log_weights, particles, generator):
    """A resampling that reorders every grid's particles (reversed) and reports that it did."""
    order = torch.arange(len(log_weights)).view(-1, particles).flip(1).flatten()
    cache.reorder(order)
    log_weights.zero_()
    return True


@pytest.mark.parametrize("resampling", ["forced at every hole", "as the weights call for it"])
def test_after_resampling_each_particle_draws_from_its_own_conditional(monkeypatch, resampling):
    model = random_prior(sharpness=30.0)  # sharp: the given codes between holes spend weights
    grid = torch.randint(24, (2, 6, 6), generator=torch.Generator().manual_seed(5))
    grid[:, 1:5, ::2] = -1
    used, resampled = [], []
    fill, resample = sampling._fill_site, sampling._resample

    def checked_fill(out, r, c, logits, *rest):
        with torch.no_grad():
            used.append((logits.clone(), model(out[:, : r + 1].clamp(min=0))[:, :, r, c]))
        fill(out, r, c, logits, *rest)

    def counted_resample(*args):
        resampled.append(resample(*args))
        return resampled[-1]

    monkeypatch.setattr(sampling, "_resample", _reverse_every_grid
                        if resampling == "forced at every hole" else counted_resample)
    monkeypatch.setattr(sampling, "_fill_site", checked_fill)
    sample_particles(model, grid, 8, 1.0, torch.Generator().manual_seed(0))
    assert resampling == "forced at every hole" or any(resampled)
    for logits, forward in used:
        torch.testing.assert_close(logits, forward, rtol=1e-4, atol=1e-5)


def test_sample_input_is_minus_one_or_a_code():
    assert torch.equal(check_sample_input(torch.tensor([[[-1, 0, 23]]]), 24),
                       torch.tensor([[[-1, 0, 23]]]))
    for bad in (-2, 24):
        with pytest.raises(ValueError):
            check_sample_input(torch.tensor([[[bad]]]), 24)


def test_inverse_cdf_at_the_edges_and_at_temperature():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)).expand(3, 3)
    u = torch.tensor([0.0, 0.49, 0.999999], dtype=torch.float64)
    assert inverse_cdf(logits, 1.0, u).tolist() == [0, 1, 2]
    # at temperature 0.5 the probabilities are ∝ p²: 0.04, 0.09, 0.25 of 0.38
    u = torch.tensor([0.1, 0.2, 0.35], dtype=torch.float64)
    assert inverse_cdf(logits, 0.5, u).tolist() == [0, 1, 2]
    assert inverse_cdf(logits, 1.0, u).tolist() == [0, 0, 1]


def test_nucleus_of_the_whole_mass_keeps_every_code():
    probs = torch.softmax(torch.randn(5, 9, dtype=torch.float64), dim=-1)
    assert torch.equal(nucleus(probs, 1.0), probs)
