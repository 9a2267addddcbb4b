import pytest
import torch

from brainvq.inference.cuda_graph import (
    _GRAPHS,
    _StaticSampler,
    clear_graph_cache,
    draw_uniforms,
    fp32_math,
    naive_sample_with_uniforms,
    sample_with_cuda_graph,
    sample_with_static_step,
)
from brainvq.inference.sampling import inverse_cdf, sample, sites_to_fill
from modules import PixelCNN, PriorConfig

TINY = PriorConfig(n_codes=32, channels=16, dilations=(1, 2, 1))
# Wider taps, a dilated first layer (its taps then live in several slot phases), no positions,
# and van den Oord et al.'s vertical stack (checkpoints saved before `vertical_residual`).
ODD = PriorConfig(n_codes=32, channels=12, kernel_size=5, dilations=(2, 1, 3), grid_size=0,
                  vertical_residual=False)
# Slice-conditioned, with and without the per-site position embedding.
CONDITIONED = PriorConfig(n_codes=32, channels=16, dilations=(1, 2, 1), slice_bins=4)
CONDITIONED_NO_GRID = PriorConfig(n_codes=32, channels=12, dilations=(2, 1), grid_size=0,
                                  slice_bins=3)
FULL_DILATIONS = (1, 2, 4, 8, 16, 1, 2, 4, 8, 16, 1, 2, 4, 1, 1)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _prior(cfg: PriorConfig, device: str = "cpu") -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(cfg).to(device).eval()


def _project_sample(prior: PixelCNN, grid: torch.Tensor, temperature: float,
                    generator: torch.Generator, method: str) -> torch.Tensor:
    """The project's sampler."""
    return sample(prior, grid, temperature, generator, method=method)


def _grids(batch: int, size: int, n_codes: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Full generation, and inpainting: a hole plus a lone site for one item only."""
    given = torch.randint(n_codes, (batch, size, size), generator=torch.Generator().manual_seed(2))
    hole = given.clone()
    hole[:, size // 4: size // 2, size // 4: 3 * size // 4] = -1
    hole[0, size - 1, size - 1] = -1
    return {"generate": torch.full_like(given, -1).to(device), "inpaint": hole.to(device)}


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
@pytest.mark.parametrize("task", ["generate", "inpaint"])
def test_static_step_matches_naive_with_the_same_uniforms(cfg, task):
    prior = _prior(cfg)
    grid = _grids(3, 8, cfg.n_codes)[task]
    uniforms = draw_uniforms(grid, torch.Generator().manual_seed(5))
    for temperature in (1.0, 0.7):
        static = sample_with_static_step(prior, grid, temperature, uniforms)
        naive = naive_sample_with_uniforms(prior, grid, temperature, uniforms)
        assert torch.equal(static, naive)
        keep = grid != -1
        assert torch.equal(static[keep], grid[keep])
        assert ((static >= 0) & (static < cfg.n_codes)).all()


@pytest.mark.parametrize("cfg", [CONDITIONED, CONDITIONED_NO_GRID], ids=["grid", "no-grid"])
@pytest.mark.parametrize("task", ["generate", "inpaint"])
def test_static_step_follows_the_slice_condition_like_naive(cfg, task):
    prior = _prior(cfg)
    with torch.no_grad():  # a condition that matters: its embeddings far apart
        prior.slice_embedding.weight.normal_(0, 2.0)
    grid = _grids(4, 8, cfg.n_codes)[task]
    uniforms = draw_uniforms(grid, torch.Generator().manual_seed(3))
    positions = torch.tensor([0.0, 0.35, 1.0, float("nan")])  # NaN: unknown level
    static = sample_with_static_step(prior, grid, 1.0, uniforms, positions)
    assert torch.equal(static, naive_sample_with_uniforms(prior, grid, 1.0, uniforms, positions))
    # and the condition is used: other levels give other grids from the same uniforms
    elsewhere = sample_with_static_step(prior, grid, 1.0, uniforms, positions.flip(0))
    assert not torch.equal(static, elsewhere)
    project = sample(prior, grid, 1.0, torch.Generator().manual_seed(3), positions=positions)
    assert torch.equal(static, project)


@pytest.mark.parametrize("tap_variant, out_variant", [(0, 1), (1, 2), (1, 0)])
def test_every_matmul_variant_the_gpu_may_pick_gives_the_same_grids(tap_variant, out_variant):
    prior = _prior(TINY)
    grid = _grids(3, 8, TINY.n_codes)["inpaint"]
    uniforms = draw_uniforms(grid, torch.Generator().manual_seed(7))
    steps = _StaticSampler(prior, grid.clone(), grid == -1, uniforms, 1.0, sites_to_fill(grid))
    steps.tap_variant, steps.out_variant = tap_variant, out_variant
    with torch.no_grad():
        steps.run()
    assert torch.equal(steps.grid, naive_sample_with_uniforms(prior, grid, 1.0, uniforms))


def test_static_step_matches_naive_in_float64():
    prior = _prior(TINY).double()
    grid = _grids(2, 8, TINY.n_codes)["inpaint"]
    uniforms = draw_uniforms(grid, torch.Generator().manual_seed(6))
    assert torch.equal(sample_with_static_step(prior, grid, 1.0, uniforms),
                       naive_sample_with_uniforms(prior, grid, 1.0, uniforms))


@pytest.mark.parametrize("task", ["generate", "inpaint"])
def test_same_generator_gives_the_grids_and_generator_state_of_project_sampler(task):
    prior = _prior(TINY)
    grid = _grids(3, 8, TINY.n_codes)[task]
    ours_gen, fast_gen, naive_gen = (torch.Generator().manual_seed(9) for _ in range(3))
    ours = sample_with_cuda_graph(prior, grid, 0.8, ours_gen)
    assert torch.equal(ours, _project_sample(prior, grid, 0.8, fast_gen, "fast"))
    assert torch.equal(ours, _project_sample(prior, grid, 0.8, naive_gen, "naive"))
    assert torch.equal(torch.rand(4, generator=ours_gen), torch.rand(4, generator=fast_gen))


def test_uniforms_are_one_per_item_per_site_in_raster_order():
    grid = torch.randint(5, (2, 3, 4))
    grid[1, 0, 3] = grid[0, 2, 1] = -1  # two sites, each −1 for one item only
    uniforms = draw_uniforms(grid, torch.Generator().manual_seed(1))
    expected = torch.rand(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert uniforms.shape == (2, 2) and uniforms.dtype == torch.float64
    assert torch.equal(uniforms, expected)


def test_inverse_cdf_picks_the_bin_holding_the_uniform():
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]] * 4))
    u = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
    assert inverse_cdf(logits, 1.0, u).tolist() == [0, 1, 2, 2]


def test_nothing_to_fill_returns_a_copy():
    prior = _prior(TINY)
    grid = torch.randint(TINY.n_codes, (2, 4, 4))
    out = sample_with_cuda_graph(prior, grid, 1.0, None)
    assert torch.equal(out, grid) and out.data_ptr() != grid.data_ptr()
    assert draw_uniforms(grid, None).shape == (0, 2)


def test_rejects_what_prior_sample_rejects():
    prior = _prior(TINY)
    with pytest.raises(ValueError):
        sample_with_cuda_graph(prior, torch.full((4, 4), -1), 1.0, None)
    with pytest.raises(ValueError):
        sample_with_cuda_graph(prior, torch.full((1, 4, 4), TINY.n_codes), 1.0, None)


def test_fp32_math_switches_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with pytest.raises(KeyError), fp32_math():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            raise KeyError  # restored on the way out of an error too
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------- CUDA only
def _first_mismatch_margins(prior, ours, naive, grid, uniforms, temperature,
                            positions=None) -> list[float]:
    """Per grid that differs, how close its uniform sat to a CDF boundary of the naive logits
    at the first differing site: ~1e-7 means rounding flipped a near-tie, not a bug."""
    sites = [tuple(s) for s in (grid == -1).any(0).nonzero().tolist()]
    margins = []
    for b in (ours != naive).flatten(1).any(1).nonzero().flatten().tolist():
        k = next(k for k, (r, c) in enumerate(sites) if ours[b, r, c] != naive[b, r, c])
        r, c = sites[k]
        with torch.no_grad(), fp32_math():
            where = None if positions is None else positions[b: b + 1]
            logits = prior(naive[b: b + 1, : r + 1].clamp(min=0), where)[0, :, r, c]
        cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
        margins.append(((cdf - uniforms[k, b] * cdf[-1]).abs().min() / cdf[-1]).item())
    return margins


@pytest.fixture(scope="module")
def full_prior():
    return _prior(PriorConfig(channels=128, dilations=FULL_DILATIONS), "cuda")


@pytest.fixture(scope="module")
def narrow_prior():
    """Full dilations and codes, fewer channels: naive sampling at batch 256 stays quick."""
    return _prior(PriorConfig(channels=32, dilations=FULL_DILATIONS), "cuda")


@cuda_only
@pytest.mark.parametrize("batch, which", [(1, "full"), (16, "full"), (64, "narrow"),
                                          (256, "narrow")])
def test_graph_matches_naive_on_cuda(batch, which, request):
    prior = request.getfixturevalue(f"{which}_prior")
    for task, grid in _grids(batch, 32, prior.cfg.n_codes, "cuda").items():
        uniforms = draw_uniforms(grid, torch.Generator("cuda").manual_seed(batch))
        ours = sample_with_cuda_graph(prior, grid, 1.0,
                                      torch.Generator("cuda").manual_seed(batch))
        naive = naive_sample_with_uniforms(prior, grid, 1.0, uniforms)
        margins = _first_mismatch_margins(prior, ours, naive, grid, uniforms, 1.0)
        assert all(m < 1e-5 for m in margins), f"{task}: differ beyond near-ties {margins}"
        assert len(margins) <= max(1, batch // 64), f"{task}: {len(margins)} grids differ"
    clear_graph_cache()


@cuda_only
def test_conditioned_graph_matches_naive_on_cuda_and_replays_new_positions():
    prior = _prior(PriorConfig(channels=32, dilations=FULL_DILATIONS, slice_bins=16), "cuda")
    clear_graph_cache()
    grid = _grids(16, 32, prior.cfg.n_codes, "cuda")["generate"]
    for seed, positions in enumerate([torch.linspace(0, 1, 16), torch.rand(16)]):
        positions = positions.cuda()
        uniforms = draw_uniforms(grid, torch.Generator("cuda").manual_seed(seed))
        ours = sample_with_cuda_graph(prior, grid, 1.0, torch.Generator("cuda").manual_seed(seed),
                                      positions)
        naive = naive_sample_with_uniforms(prior, grid, 1.0, uniforms, positions)
        margins = _first_mismatch_margins(prior, ours, naive, grid, uniforms, 1.0, positions)
        assert all(m < 1e-5 for m in margins) and len(margins) <= 1, margins
    assert len(_GRAPHS) == 1  # new positions replay the same graph
    clear_graph_cache()


@cuda_only
def test_graph_is_captured_once_per_shape_and_replays_reproducibly(narrow_prior):
    clear_graph_cache()
    grid = torch.full((4, 32, 32), -1, device="cuda")
    first = sample_with_cuda_graph(narrow_prior, grid, 1.0, torch.Generator("cuda").manual_seed(1))
    graph = next(iter(_GRAPHS.values()))
    again = sample_with_cuda_graph(narrow_prior, grid, 1.0, torch.Generator("cuda").manual_seed(1))
    other = sample_with_cuda_graph(narrow_prior, grid, 1.0, torch.Generator("cuda").manual_seed(2))
    assert len(_GRAPHS) == 1 and next(iter(_GRAPHS.values())) is graph
    assert torch.equal(first, again) and not torch.equal(first, other)
    bias = narrow_prior.head[3].bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1.0)  # weights updated in place: the graph must be captured anew
    try:
        sample_with_cuda_graph(narrow_prior, grid, 1.0, torch.Generator("cuda").manual_seed(1))
        assert len(_GRAPHS) == 1 and next(iter(_GRAPHS.values())) is not graph
    finally:
        with torch.no_grad():
            bias.copy_(saved)
        clear_graph_cache()
