import pytest
import torch

from brainvq.inference.sampling import inverse_cdf, nucleus, sample, sample_cached
from modules import (
    VQVAE,
    PixelCNN,
    PriorConfig,
    VectorQuantiser,
    VQVAEConfig,
    principal_components,
)
from priors import random_prior

SMALL_VQ = VQVAEConfig(hidden=(8, 8, 16), n_res_blocks=1, embedding_dim=8, n_codes=32)


def test_vqvae_shapes_and_entry_points():
    model = VQVAE(SMALL_VQ).eval()
    x = torch.randn(2, 1, 256, 256)
    out = model(x)
    assert out.reconstruction.shape == (2, 1, 256, 256)
    assert out.indices.shape == (2, 32, 32)
    indices = model.image_to_indices(x)
    assert torch.equal(indices, out.indices)
    assert model.indices_to_latents(indices).shape == (2, 8, 32, 32)
    assert torch.allclose(model.indices_to_image(indices), out.reconstruction, atol=1e-5)


def test_straight_through_gradient_reaches_encoder():
    for ema in (True, False):
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig(**{**SMALL_VQ.__dict__, "ema": ema}))
        out = model(torch.randn(2, 1, 256, 256))
        (out.reconstruction.pow(2).mean()).backward()
        first_conv = model.encoder.net[0][0]
        assert first_conv.weight.grad is not None
        assert first_conv.weight.grad.abs().sum() > 0


def test_gradient_codebook_gets_codebook_loss_gradient():
    model = VQVAE(VQVAEConfig(**{**SMALL_VQ.__dict__, "ema": False}))
    model(torch.randn(2, 1, 256, 256)).vq_loss.backward()
    assert model.quantiser.codebook.grad.abs().sum() > 0


def test_quantiser_picks_true_nearest_code():
    torch.manual_seed(0)
    q = VectorQuantiser(VQVAEConfig(n_codes=64, embedding_dim=5)).eval()
    z = torch.randn(3, 5, 7, 6)
    out = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.stack([((q.codebook - v) ** 2).sum(1).argmin() for v in flat])
    assert torch.equal(out.indices.flatten(), brute)
    assert torch.allclose(out.quantised, q.lookup(out.indices), atol=1e-6)


def test_quantiser_runs_in_fp32_under_autocast():
    q = VectorQuantiser(VQVAEConfig(n_codes=16, embedding_dim=4)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(1, 4, 3, 3).bfloat16())
    assert out.quantised.dtype == torch.float32


def test_ema_codebook_moves_towards_assigned_vectors_and_restarts_dead_codes():
    torch.manual_seed(0)
    q = VectorQuantiser(VQVAEConfig(n_codes=8, embedding_dim=2, ema_decay=0.5,
                                     dead_code_steps=2)).train()
    z = torch.randn(1, 2, 4, 4) + 10.0
    q(z)  # first call seeds the codebook from the encoder outputs
    assert bool(q.initialised)
    assert (q.codebook - 10).abs().max() < 5
    q.codebook[0] = torch.tensor([-100.0, -100.0])  # never chosen: dead after 2 steps
    q(z)
    q(z)
    assert (q.codebook[0] - 10).abs().max() < 5


def _logits_at(model, indices, r, c):
    return model(indices)[0, :, r, c]


def test_pixelcnn_causal_and_no_blind_spot():
    torch.manual_seed(0)
    size, k = 8, 16
    # float64 and exact comparisons: later sites never enter the computation at all, while
    # an earlier site's influence can be far below float32 noise at initialisation.
    model = PixelCNN(PriorConfig(n_codes=k, channels=16, dilations=(1, 2, 1, 2, 1, 1)))
    model = model.eval().double()
    indices = torch.randint(k, (1, size, size))
    for r, c in [(0, 0), (3, 5), (5, 0), (7, 7)]:
        base = _logits_at(model, indices, r, c)
        for rr in range(size):
            for cc in range(size):
                changed = indices.clone()
                changed[0, rr, cc] = (changed[0, rr, cc] + 1) % k
                moved = not torch.equal(_logits_at(model, changed, r, c), base)
                earlier = (rr, cc) < (r, c)
                assert moved == earlier, f"site {(r, c)} vs {(rr, cc)}"


def test_default_prior_sees_the_whole_grid():
    """The last site of a 32×32 grid depends on the first one (receptive field covers it)."""
    # float64: at initialisation the influence across 31 rows is ~1e-9, below float32 noise.
    model = PixelCNN(PriorConfig(n_codes=16)).eval().double()
    indices = torch.zeros(1, 32, 32, dtype=torch.long)
    changed = indices.clone()
    changed[0, 0, 0] = 5
    assert (model(indices)[0, :, 31, 31] != model(changed)[0, :, 31, 31]).any()


def test_sample_keeps_given_indices_and_fills_the_rest():
    torch.manual_seed(0)
    k = 16
    model = PixelCNN(PriorConfig(n_codes=k, channels=8, dilations=(1, 2))).eval()
    given = torch.randint(k, (3, 6, 6))
    masked = given.clone()
    masked[:, 3:] = -1
    masked[1, 0, 2] = -1
    out = sample(model, masked, generator=torch.Generator().manual_seed(1))
    keep = masked != -1
    assert torch.equal(out[keep], given[keep])
    assert ((out >= 0) & (out < k)).all()


def test_sample_is_reproducible_with_a_seeded_generator():
    model = PixelCNN(PriorConfig(n_codes=16, channels=8, dilations=(1, 2))).eval()
    grid = torch.full((2, 5, 5), -1)
    a = sample(model, grid, generator=torch.Generator().manual_seed(3))
    b = sample(model, grid, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bits_per_index_of_uniform_prior_is_log2_k():
    model = PixelCNN(PriorConfig(n_codes=16, channels=8, dilations=(1,)))
    for p in model.head[-1].parameters():
        torch.nn.init.zeros_(p)
    bits = model.bits_per_index(torch.randint(16, (2, 4, 4)))
    assert abs(bits.item() - 4.0) < 1e-5


@pytest.mark.parametrize("vertical_residual", [True, False])
def test_fast_sampler_matches_naive_exactly_for_generation_and_inpainting(vertical_residual):
    model = random_prior(dilations=(1, 2, 4, 1), vertical_residual=vertical_residual)
    given = torch.randint(24, (3, 9, 7))
    square = given.clone()
    square[:, 3:6, 2:5] = -1
    square[0, 8, 6] = -1  # a lone site after the hole, for one item only
    for grid in (torch.full((3, 9, 7), -1), square):
        fast = sample(model, grid, 1.0, torch.Generator().manual_seed(5), method="fast")
        naive = sample(model, grid, 1.0, torch.Generator().manual_seed(5), method="naive")
        assert torch.equal(fast, naive)


def test_nucleus_keeps_the_likeliest_codes_until_they_hold_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.6, 0.15, 0.15, 0.1]], dtype=torch.float64)
    # row 0: 0.5, 0.5 + 0.25 < 0.8, then 0.15 reaches it; row 1: 0.6 + 0.15 + 0.15 passes it
    assert nucleus(probs, 0.8).tolist() == [[0.0, 0.5, 0.15, 0.25], [0.6, 0.15, 0.15, 0.0]]
    assert nucleus(probs, 0.5).tolist() == [[0.0, 0.5, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]]
    assert nucleus(probs, 1e-9).tolist() == [[0.0, 0.5, 0.0, 0.0], [0.6, 0.0, 0.0, 0.0]]


def test_inverse_cdf_draws_only_from_the_nucleus_and_is_unchanged_without_one():
    logits = torch.randn(4000, 12, generator=torch.Generator().manual_seed(0))
    u = torch.rand(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept = nucleus(torch.softmax(logits.double() / 0.7, dim=-1), 0.6) > 0
    drawn = inverse_cdf(logits, 0.7, u, top_p=0.6)
    assert kept[torch.arange(4000), drawn].all()
    assert len(set(drawn.tolist())) > 1  # not only the likeliest code
    whole = inverse_cdf(logits, 0.7, u)
    assert torch.equal(inverse_cdf(logits, 0.7, u, top_p=1.0), whole)
    assert not kept[torch.arange(4000), whole].all()  # the whole distribution leaves it


def test_fast_sampler_matches_naive_exactly_with_a_nucleus():
    model = random_prior(dilations=(1, 2, 4, 1))
    grid = torch.full((3, 6, 5), -1)
    fast = sample(model, grid, 1.0, torch.Generator().manual_seed(5), "fast", top_p=0.5)
    naive = sample(model, grid, 1.0, torch.Generator().manual_seed(5), "naive", top_p=0.5)
    assert torch.equal(fast, naive)
    assert not torch.equal(fast, sample(model, grid, 1.0, torch.Generator().manual_seed(5)))


def test_fast_sampler_logits_match_a_full_forward_pass_on_the_final_grid():
    model = random_prior(dilations=(1, 2, 4, 1))
    grid = torch.randint(24, (2, 8, 8))
    grid[:, 2:, 3:] = -1
    out, logits = sample_cached(model, grid.clone(), 1.0, torch.Generator().manual_seed(0))
    full = model(out)
    sampled = grid == -1
    assert sampled.any()
    torch.testing.assert_close(logits.permute(0, 2, 3, 1)[sampled],
                               full.permute(0, 2, 3, 1)[sampled], rtol=1e-4, atol=1e-5)
    assert torch.isnan(logits.permute(0, 2, 3, 1)[~(grid == -1).any(0).expand_as(grid)]).all()


def test_principal_components_are_uncorrelated_unit_variance_and_ordered():
    torch.manual_seed(0)
    axes = torch.linalg.qr(torch.randn(3, 3))[0]  # orthonormal rows
    x = (torch.randn(200, 3) * torch.tensor([5.0, 1.0, 0.1])) @ axes + 3
    coords = principal_components(x, 8)
    assert coords.shape == (200, 3)  # no more components than dimensions
    assert torch.allclose(coords.std(0), torch.ones(3), atol=1e-5)
    assert torch.allclose(torch.corrcoef(coords.t()), torch.eye(3), atol=1e-4)
    along_widest = x @ axes[0]
    assert torch.corrcoef(torch.stack([coords[:, 0], along_widest]))[0, 1].abs() > 0.99


def test_prior_embedding_from_codebook_puts_similar_codes_close():
    torch.manual_seed(0)
    centres = torch.randn(2, 16) * 5
    codebook = torch.cat([centres[0] + 0.1 * torch.randn(8, 16),
                          centres[1] + 0.1 * torch.randn(8, 16)])
    model = PixelCNN(PriorConfig(n_codes=16, channels=32, dilations=(1,)))
    before = model.embedding.weight.clone()
    model.embed_like(codebook)
    leading = model.embedding.weight[:, 0]  # the axis that separates the two clusters
    assert (leading[:8].sign() == -leading[8:].sign()).all()
    assert leading[:8].std() < 0.1 * (leading[:8].mean() - leading[8:].mean()).abs()
    assert torch.equal(model.embedding.weight[:, 16:], before[:, 16:])  # beyond D: untouched
    with pytest.raises(ValueError, match="codes"):
        model.embed_like(codebook[:10])


def test_slice_position_conditions_every_site_and_unknown_has_its_own_vector():
    model = random_prior(slice_bins=5, grid_size=8)
    grid = torch.randint(24, (3, 8, 8))
    low, high = torch.zeros(3), torch.ones(3)
    assert (model(grid, low) - model(grid, high)).abs().amax(dim=(0, 1)).min() > 0
    unknown = model(grid, torch.full((3,), float("nan")))
    assert torch.equal(unknown, model(grid))  # no positions: the "unknown" vector
    assert not torch.allclose(unknown, model(grid, low))
    halfway = model.slice_condition(torch.tensor([0.125]), 1)  # between bins 0 and 1 of 5
    table = model.slice_embedding.weight
    torch.testing.assert_close(halfway[0, 0, 0], (table[0] + table[1]) / 2)


def test_a_conditioned_prior_stays_causal():
    model = random_prior(slice_bins=5, grid_size=8).double()
    grid = torch.randint(24, (1, 6, 6))
    where = torch.tensor([0.3])
    changed = grid.clone()
    changed[0, 3, 2] = (grid[0, 3, 2] + 1) % 24
    before, after = model(grid, where), model(changed, where)
    order = torch.arange(36).view(6, 6)
    earlier_or_same = order <= 3 * 6 + 2
    assert torch.equal(before[0][:, earlier_or_same], after[0][:, earlier_or_same])


@pytest.mark.parametrize("grid_size", [8, 0])
def test_fast_sampler_matches_naive_with_slice_positions(grid_size):
    model = random_prior(slice_bins=5, grid_size=grid_size)
    grid = torch.full((3, 8, 8), -1)
    grid[1, :4] = torch.randint(24, (4, 8))
    where = torch.tensor([0.1, float("nan"), 0.9])
    fast = sample(model, grid, 1.0, torch.Generator().manual_seed(5), "fast", where)
    naive = sample(model, grid, 1.0, torch.Generator().manual_seed(5), "naive", where)
    assert torch.equal(fast, naive)
    out, logits = sample_cached(model, grid.clone(), 1.0, torch.Generator().manual_seed(0),
                                where)
    sampled = (grid == -1).any(0).expand_as(grid)
    torch.testing.assert_close(logits.permute(0, 2, 3, 1)[sampled],
                               model(out, where).permute(0, 2, 3, 1)[sampled],
                               rtol=1e-4, atol=1e-5)
