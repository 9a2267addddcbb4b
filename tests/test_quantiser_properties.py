"""What the vector quantiser must do, each stated with a known answer: the commitment loss's
gradient reaches the encoder output only, the codebook loss's reaches the codebook only, the
straight-through output is the chosen codes with gradient one, the EMA codebook is the decayed
running mean worked out by hand, unused codes are re-seeded on time and by squared error, and a
checkpointed quantiser continues like one never stopped. float64 throughout: the comparisons
hold under every CPU kernel set."""
import pytest
import torch
import torch.nn.functional as F

from brainvq.io_utils import load_checkpoint, save_checkpoint
from modules import VQVAE, ChannelNorm, VectorQuantiser, VQVAEConfig, _random_rows, at_least_fp32

BETA = 0.3
CLOSE = {"rtol": 1e-10, "atol": 1e-13}


def make_quantiser(eps: float = 1e-5, seed: int = 0, **config) -> VectorQuantiser:
    torch.manual_seed(seed)
    settings = {"n_codes": 6, "embedding_dim": 3, "beta": BETA, **config}
    return VectorQuantiser(VQVAEConfig(**settings), eps=eps).double()


def rows_of(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) → (B·H·W, D), the quantiser's order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def grid_of(rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B·H·W, D) → (B, D, H, W)."""
    return rows.reshape(-1, height, width, rows.shape[1]).permute(0, 3, 1, 2).contiguous()


def nearest_by_hand(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return ((rows[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)


def is_one_of(codes: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether every code is exactly one of the rows (float64 differences of equal rows are 0;
    torch.cdist's matmul form would round)."""
    return bool(((codes[:, None, :] - rows[None]) == 0).all(-1).any(1).all())


def chosen_codes(q: VectorQuantiser, indices: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → (B, D, H, W) rows of the quantiser's codebook as it is now."""
    return q.codebook.detach()[indices].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- the two losses
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_commitment_gradient_reaches_the_encoder_output_as_2_beta_z_minus_e_over_n(ema, training):
    """In training e is the codebook after this step's update (EMA, and the first call's
    seeding from the batch), the codes the loss compares z with."""
    q = make_quantiser(ema=ema).train(training)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = q(z)
    out.loss.backward()
    e = chosen_codes(q, out.indices)
    torch.testing.assert_close(z.grad, 2 * BETA * (z.detach() - e) / z.numel(), **CLOSE)
    if ema:
        assert not q.codebook.requires_grad  # a buffer: nothing but the EMA moves it
    else:  # the codebook loss's gradient, 2(e − z)/N summed per code, and no commitment term
        per_site = rows_of(2 * (e - z.detach()) / z.numel())
        expected = torch.zeros_like(q.codebook).index_add_(0, out.indices.flatten(), per_site)
        torch.testing.assert_close(q.codebook.grad, expected, **CLOSE)


def test_codebook_loss_moves_only_the_codebook():
    q = make_quantiser(ema=False, beta=0.0).eval()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    q(z).loss.backward()
    assert torch.count_nonzero(z.grad) == 0
    assert torch.count_nonzero(q.codebook.grad) > 0


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_losses_are_the_mean_squared_distance_and_the_total_weighs_them(ema):
    q = make_quantiser(ema=ema).eval()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = q(z)
    mse = ((z.detach() - chosen_codes(q, out.indices)) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, mse, **CLOSE)
    torch.testing.assert_close(out.codebook_loss, mse, **CLOSE)
    torch.testing.assert_close(out.loss, BETA * mse + (0 if ema else mse), **CLOSE)
    # the parts are reported for logging: values only, no graph kept alive
    assert not out.commitment_loss.requires_grad and not out.codebook_loss.requires_grad


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_straight_through_output_is_the_chosen_codes_and_passes_gradient_one(ema):
    q = make_quantiser(ema=ema).eval()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = q(z)
    torch.testing.assert_close(out.quantised, q.lookup(out.indices).detach(), **CLOSE)
    weights = torch.randn_like(z)
    (out.quantised * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights, **CLOSE)
    if not ema:  # the codes reach the decoder as values: the codebook learns from its loss only
        assert q.codebook.grad is None or torch.count_nonzero(q.codebook.grad) == 0


def test_eval_mode_leaves_every_buffer_alone():
    q = make_quantiser().eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


# ------------------------------------------------------------------ the codebook's first fill
def test_a_fresh_quantiser_has_unit_scale_codes_and_is_not_initialised():
    torch.manual_seed(0)
    q = VectorQuantiser(VQVAEConfig(n_codes=512, embedding_dim=64))
    assert not bool(q.initialised) and torch.count_nonzero(q.steps_unused) == 0
    assert 0.9 < q.codebook.pow(2).sum(1).mean() < 1.1  # randn / √D: rows of norm ~1
    assert torch.equal(q.ema_sum, q.codebook) and torch.equal(q.ema_count, torch.ones(512))


def test_first_training_call_fills_the_codebook_with_distinct_encoder_outputs():
    q = make_quantiser(ema=False, n_codes=8, embedding_dim=2).train()
    background = torch.zeros(30, 2, dtype=torch.float64)  # many identical rows
    rows = torch.cat([background, torch.randn(10, 2, dtype=torch.float64)])
    q(grid_of(rows, 5, 8))
    assert bool(q.initialised)
    assert is_one_of(q.codebook.detach(), rows)  # every code is an encoder output
    assert len(torch.unique(q.codebook.detach(), dim=0)) == 8  # no twins to tie


@pytest.mark.parametrize("spread", [1.0, 0.0], ids=["varied", "constant"])
def test_missing_distinct_rows_are_jittered_copies_at_one_percent_of_the_spread(spread):
    torch.manual_seed(0)
    distinct = torch.randn(3, 4, dtype=torch.float64) * spread
    rows = distinct[torch.arange(60) % 3]
    codes = _random_rows(rows, 40)
    assert len(torch.unique(codes, dim=0)) == 40
    offsets = codes[:, None, :] - distinct[None]  # (40, 3, 4)
    nearest = offsets.pow(2).sum(-1).argmin(1)
    jitter = offsets[torch.arange(40), nearest]
    exact = (jitter == 0).all(1)
    assert exact.sum() == len(torch.unique(rows, dim=0))  # each distinct row once, then copies
    scale = max(rows.std().item(), 1e-3) * 0.01
    rms = jitter[~exact].pow(2).mean().sqrt().item()
    assert 0.7 * scale < rms < 1.3 * scale


def test_nearest_code_is_the_euclidean_nearest_in_float64():
    q = make_quantiser(n_codes=50, embedding_dim=4).eval()
    rows = torch.randn(300, 4, dtype=torch.float64) * 2
    assert torch.equal(q.nearest_code(rows), nearest_by_hand(rows, q.codebook))


# ---------------------------------------------------------------------- EMA updates by hand
def ema_by_hand(count: torch.Tensor, total: torch.Tensor, rows: torch.Tensor,
                codebook: torch.Tensor, decay: float, eps: float):
    """One EMA step: counts and sums of the rows assigned to each code, decayed running
    count and sum, Laplace-smoothed count, new codes = sum / smoothed count."""
    indices = nearest_by_hand(rows, codebook)
    k = len(count)
    counts = torch.bincount(indices, minlength=k).double()
    sums = torch.zeros_like(total).index_add_(0, indices, rows)
    count = decay * count + (1 - decay) * counts
    total = decay * total + (1 - decay) * sums
    n = count.sum()
    smoothed = (count + eps) / (n + k * eps) * n
    return count, total, total / smoothed[:, None], indices


def test_ema_codebook_is_the_decayed_running_mean_computed_by_hand():
    decay, eps, k, d = 0.8, 0.5, 4, 3  # a large eps, so that the smoothing shows
    q = make_quantiser(eps=eps, n_codes=k, embedding_dim=d, ema_decay=decay).train()
    z1 = torch.randn(1, d, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    seeds = _random_rows(rows_of(z1), k)  # what the first call fills the codebook with
    torch.manual_seed(1)
    out = q(z1)
    count, total, codebook, indices = ema_by_hand(torch.ones(k, dtype=torch.float64),
                                                  seeds.clone(), rows_of(z1), seeds, decay, eps)
    assert torch.equal(out.indices.flatten(), indices)
    torch.testing.assert_close(q.ema_count, count, **CLOSE)
    torch.testing.assert_close(q.ema_sum, total, **CLOSE)
    torch.testing.assert_close(q.codebook, codebook, **CLOSE)
    assert torch.count_nonzero(q.steps_unused) == 0  # every seeded code was used

    # a second batch close to codes 0 and 1 only: codes 2 and 3 only decay
    near = codebook[torch.arange(12) % 2] + 0.01 * torch.randn(12, d, dtype=torch.float64)
    out = q(grid_of(near, 3, 4))
    count, total, codebook, indices = ema_by_hand(count, total, near, codebook, decay, eps)
    assert torch.equal(out.indices.flatten(), indices) and set(indices.tolist()) == {0, 1}
    torch.testing.assert_close(q.ema_count, count, **CLOSE)
    torch.testing.assert_close(q.ema_sum, total, **CLOSE)
    torch.testing.assert_close(q.codebook, codebook, **CLOSE)
    assert q.steps_unused.tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- dead codes
def seeded(q: VectorQuantiser, codebook: list[list[float]]) -> VectorQuantiser:
    """`q` as if it had already been initialised with `codebook`."""
    with torch.no_grad():
        q.codebook.copy_(torch.tensor(codebook, dtype=torch.float64))
        if q.ema:
            q.ema_sum.copy_(q.codebook)
            q.ema_count.fill_(1.0)
        q.initialised.fill_(True)
    return q.train()


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_a_code_unused_for_dead_code_steps_steps_is_reseeded_from_the_batch(ema):
    q = seeded(make_quantiser(ema=ema, n_codes=4, embedding_dim=2, dead_code_steps=3),
               [[0, 0], [1, 0], [0, 1], [50, 50]])
    rows = torch.tensor([[0, 0], [1, 0], [0, 1]], dtype=torch.float64).repeat(4, 1)
    z = grid_of(rows + 0.05 * torch.randn(12, 2, dtype=torch.float64), 3, 4)
    for step in (1, 2):
        q(z)
        assert q.steps_unused.tolist() == [0, 0, 0, step]
        assert q.codebook[3].min() > 40  # not yet
    q(z)
    assert q.steps_unused.tolist() == [0, 0, 0, 0]
    fresh = q.codebook.detach()[3]
    assert is_one_of(fresh[None], rows_of(z))  # one of the batch's outputs
    if ema:
        assert torch.equal(q.ema_sum[3], fresh) and q.ema_count[3] == 1


def test_a_code_used_once_is_alive():
    q = seeded(make_quantiser(n_codes=3, embedding_dim=1, dead_code_steps=5),
               [[0.0], [10.0], [20.0]])
    rows = torch.tensor([[0.1], [0.2], [9.9], [20.1]], dtype=torch.float64)  # 2, 1 and 1 uses
    q(grid_of(rows, 2, 2))
    q(grid_of(rows[:2], 1, 2))
    assert q.steps_unused.tolist() == [0, 1, 1]


def dead_code_setup(n_dead: int, rows: torch.Tensor, codes: list[float]) -> VectorQuantiser:
    """A 1-D quantiser with `codes` in use and `n_dead` far codes that die on the next step."""
    far = [1000.0 + i for i in range(n_dead)]
    q = seeded(make_quantiser(ema=False, n_codes=len(codes) + n_dead, embedding_dim=1,
                              dead_code_steps=1), [[c] for c in codes + far])
    return q


def test_dead_codes_are_drawn_in_proportion_to_the_squared_quantisation_error():
    rows = torch.tensor([[1.0], [13.0]], dtype=torch.float64)  # errors 1 and 3 from 0 and 10
    q = dead_code_setup(2000, rows, [0.0, 10.0])
    torch.manual_seed(0)
    q(grid_of(rows, 1, 2))
    fresh = q.codebook.detach()[2:, 0]
    assert ((fresh == 1) | (fresh == 13)).all()
    assert abs((fresh == 13).double().mean().item() - 9 / 10) < 0.03  # 3² / (1² + 3²)


def test_codes_die_and_are_reseeded_even_when_the_batch_is_quantised_exactly():
    rows = torch.tensor([[0.0], [10.0], [0.0], [10.0]], dtype=torch.float64)
    q = dead_code_setup(3, rows, [0.0, 10.0])
    q(grid_of(rows, 2, 2))  # every error is zero: the draw must still work
    assert set(q.codebook.detach()[2:, 0].tolist()) <= {0.0, 10.0}


def test_enough_encoder_outputs_reseed_the_dead_codes_without_repeats():
    rows = torch.randn(40, 1, dtype=torch.float64)
    q = dead_code_setup(40, rows, [-5.0, 5.0])
    torch.manual_seed(0)
    q(grid_of(rows, 5, 8))
    fresh = q.codebook.detach()[2:, 0]
    assert len(torch.unique(fresh)) == 40


# --------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_a_checkpointed_quantiser_continues_exactly_like_an_uninterrupted_one(ema, tmp_path):
    cfg = VQVAEConfig(n_codes=6, embedding_dim=2, ema=ema, ema_decay=0.7, dead_code_steps=2)
    torch.manual_seed(0)
    first = torch.randn(1, 2, 3, 3)
    running = VectorQuantiser(cfg).train()
    running(first)
    near_one = grid_of(running.codebook.detach()[:1].repeat(9, 1) + 0.01 * torch.randn(9, 2),
                       3, 3)
    running(near_one)  # most codes unused now: their counters run
    assert running.steps_unused.max() > 0
    save_checkpoint({"model": running.state_dict()}, tmp_path / "quantiser.pt")
    state = load_checkpoint(tmp_path / "quantiser.pt")["model"]
    buffers = {"codebook", "initialised", "steps_unused"} | ({"ema_count", "ema_sum"} if ema
                                                             else set())
    assert set(state) == buffers
    torch.manual_seed(5)  # another initial codebook: everything must come from the file
    resumed = VectorQuantiser(cfg)
    resumed.load_state_dict(state)
    resumed.train()
    for name in buffers:
        assert torch.equal(getattr(resumed, name), getattr(running, name)), name
    outputs = []
    for q in (running, resumed):
        torch.manual_seed(3)  # the dead-code draw of the next step
        outputs.append(q(near_one))
    assert torch.equal(outputs[0].indices, outputs[1].indices)
    torch.testing.assert_close(outputs[0].quantised, outputs[1].quantised, rtol=0, atol=0)
    for name in buffers:
        assert torch.equal(getattr(resumed, name), getattr(running, name)), name


# ------------------------------------------------------------------- the model around it
def test_vqvae_reports_its_quantiser_on_the_encoder_output():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(hidden=(4, 4, 8), n_res_blocks=1, embedding_dim=4,
                              n_codes=16)).double().eval()
    x = torch.randn(2, 1, 32, 48, dtype=torch.float64)  # not square: rows and columns differ
    out = model(x)
    q = model.quantiser(model.encoder(x))
    assert out.indices.shape == (2, 4, 6)
    assert torch.equal(out.indices, q.indices) and torch.equal(model.image_to_indices(x), q.indices)
    torch.testing.assert_close(out.reconstruction, model.decoder(q.quantised), **CLOSE)
    for name in ("vq_loss", "codebook_loss", "commitment_loss"):
        reference = q.loss if name == "vq_loss" else getattr(q, name)
        torch.testing.assert_close(getattr(out, name), reference, **CLOSE)
    assert not torch.equal(out.codebook_loss, out.vq_loss)  # β = 0.25 tells them apart
    torch.testing.assert_close(model.indices_to_image(out.indices), out.reconstruction,
                               **CLOSE)


def test_channel_norm_normalises_each_pixel_over_its_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3 + torch.arange(4.0)  # per column
    y = ChannelNorm(5).double()(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 4, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(2, 3, 4, dtype=torch.float64),
                               rtol=1e-4, atol=0)  # LayerNorm's eps, 1e-5
    torch.testing.assert_close(y, F.layer_norm(x.permute(0, 2, 3, 1), (5,)).permute(0, 3, 1, 2),
                               **CLOSE)


def test_at_least_fp32_widens_half_precision_only():
    for dtype in (torch.float16, torch.bfloat16):
        assert at_least_fp32(torch.ones(2, dtype=dtype)).dtype == torch.float32
    for dtype in (torch.float32, torch.float64):
        t = torch.ones(2, dtype=dtype)
        assert at_least_fp32(t) is t
