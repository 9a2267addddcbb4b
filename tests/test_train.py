import copy

import pytest
import torch

from brainvq.config import PROFILES, StageSettings
from brainvq.evaluation.metrics import ssim_torch
from brainvq.training.engine import epoch_batches
from brainvq.training.stages import (
    make_optimiser,
    random_crops,
    vqvae_losses,
    warmup_then_decay,
)
from dataset import Normalisation
from modules import VQVAE, PixelCNN, PriorConfig
from train import parse_args, resolve_profile


def test_random_crops_sit_on_the_code_lattice_inside_the_margin():
    images = torch.arange(256).repeat(256, 1)[None].repeat(50, 1, 1)  # pixel value = column
    rows = torch.arange(256)[:, None].repeat(1, 256)[None].repeat(50, 1, 1)
    g = torch.Generator().manual_seed(0)
    cols = random_crops(images, 128, g)
    g = torch.Generator().manual_seed(0)
    rws = random_crops(rows, 128, g)
    assert cols.shape == (50, 128, 128)
    left, top = cols[:, 0, 0], rws[:, 0, 0]
    for offset in (left, top):
        assert (offset % 8 == 0).all()
        assert offset.min() >= 16 and (offset + 128).max() <= 256 - 16
    assert len(set(left.tolist())) > 3  # offsets vary between images
    assert torch.equal(random_crops(images, 0, g), images)


def test_epoch_batches_cover_every_sample_once_and_are_reproducible():
    batches = epoch_batches(10, 3, seed=1, epoch=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(10, 3, 1, 2), strict=True))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(10, 3, 1, 3)))


def test_flags_override_the_profile():
    args = parse_args(["--profile", "full", "--n-codes", "128", "--embedding-dim", "16",
                       "--vqvae-epochs", "3", "--batch-size", "5", "--prior-embedding", "random",
                       "--prior-channels", "24"])
    profile = resolve_profile(args)
    assert profile.prior.channels == 24
    assert profile.prior.dilations == PROFILES["full"].prior.dilations
    assert profile.vqvae.n_codes == 128 and profile.vqvae.embedding_dim == 16
    assert profile.vqvae.hidden == PROFILES["full"].vqvae.hidden
    assert profile.vqvae_stage.epochs == 3 and profile.vqvae_stage.batch_size == 5
    assert profile.prior_stage.epochs == PROFILES["full"].prior_stage.epochs
    assert not profile.prior_stage.embed_from_codebook
    assert PROFILES["full"].vqvae.n_codes == 512  # the preset itself is left as it was
    assert PROFILES["full"].prior.channels == 128
    args.profile = "demo"
    assert resolve_profile(args).vqvae.hidden == PROFILES["demo"].vqvae.hidden


def test_vqvae_shape_flags_override_the_profile():
    args = parse_args(["--vqvae-widths", "16", "32", "96", "--res-blocks", "1",
                       "--ssim-weight", "3"])
    profile = resolve_profile(args)
    assert profile.vqvae.hidden == (16, 32, 96) and profile.vqvae.n_res_blocks == 1
    assert profile.vqvae_stage.ssim_weight == 3.0
    assert profile.vqvae.n_codes == PROFILES["demo"].vqvae.n_codes
    assert PROFILES["demo"].vqvae.hidden != (16, 32, 96)  # the preset itself is left as it was


def test_prior_mirror_flag_turns_the_presets_mirroring_on_and_off():
    presets = {name: PROFILES[name].prior_stage.mirror for name in ("demo", "tiny")}
    for name, preset in presets.items():
        assert resolve_profile(parse_args(["--profile", name])).prior_stage.mirror == preset
        for flag, wanted in (("--prior-mirror", True), ("--no-prior-mirror", False)):
            args = parse_args(["--profile", name, flag])
            assert resolve_profile(args).prior_stage.mirror is wanted


def test_ssim_weight_adds_one_minus_ssim_on_unit_scale_pixels():
    torch.manual_seed(0)
    model = VQVAE(PROFILES["tiny"].vqvae).eval()
    norm = Normalisation(mean=0.2, std=0.3)
    x = norm.normalise(torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8))
    plain = vqvae_losses(model, x, StageSettings(epochs=1, batch_size=2, lr=1e-3), norm)
    settings = StageSettings(epochs=1, batch_size=2, lr=1e-3, ssim_weight=0.5)
    with_ssim = vqvae_losses(model, x, settings, norm)
    reconstruction = model(x).reconstruction
    expected = 0.5 * (1 - ssim_torch(x * 0.3 + 0.2, reconstruction * 0.3 + 0.2))
    assert torch.isclose(with_ssim["loss"] - plain["loss"], expected, atol=1e-6)
    assert expected > 0


def test_cpu_optimiser_steps_equal_the_per_tensor_loop_bit_for_bit():
    """make_optimiser's multi-tensor step on a CPU changes no result, only the time."""
    torch.manual_seed(0)
    ours = PixelCNN(PriorConfig(n_codes=16, channels=8, dilations=(1, 2), grid_size=8))
    reference = copy.deepcopy(ours)
    settings = StageSettings(epochs=1, batch_size=4, lr=5e-3, weight_decay=0.01)
    optimisers = [make_optimiser(ours, settings, torch.device("cpu")),
                  torch.optim.AdamW(reference.parameters(), lr=5e-3, weight_decay=0.01,
                                    foreach=False)]
    grids = torch.randint(16, (5, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    for batch in grids:
        for model, optimiser in zip((ours, reference), optimisers, strict=True):
            optimiser.zero_grad()
            model.bits_per_index(batch).backward()
            optimiser.step()
    assert optimisers[0].defaults["foreach"] and not optimisers[1].defaults["foreach"]
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def _learning_rates(decay: str, total: int = 110, warmup: int = 10) -> list[float]:
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_then_decay(optimiser, total, warmup, decay)
    rates = []
    for _ in range(total):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_learning_rate_warms_up_then_decays_to_zero(decay):
    rates = _learning_rates(decay)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:-1], rates[11:], strict=True))
    assert rates[-1] < 0.02


def test_linear_decay_falls_by_equal_steps():
    linear, cosine = _learning_rates("linear"), _learning_rates("cosine")
    steps = [a - b for a, b in zip(linear[10:-1], linear[11:], strict=True)]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx(0.01)
    assert linear[35] == pytest.approx(0.75) and cosine[35] == pytest.approx(0.8536, abs=1e-4)
    assert linear[85] == pytest.approx(0.25) and cosine[85] == pytest.approx(0.1464, abs=1e-4)


def test_an_unknown_decay_is_refused():
    with pytest.raises(ValueError, match="lr_decay"):
        StageSettings(epochs=1, batch_size=1, lr=1.0, lr_decay="step")


def test_lr_decay_flags_override_the_preset_stage_by_stage():
    demo = PROFILES["demo"]
    assert demo.prior_stage.lr_decay == demo.vqvae_stage.lr_decay == "linear"
    profile = resolve_profile(parse_args(["--prior-lr-decay", "cosine"]))
    assert (profile.prior_stage.lr_decay, profile.vqvae_stage.lr_decay) == ("cosine", "linear")
    profile = resolve_profile(parse_args(["--vqvae-lr-decay", "cosine"]))
    assert (profile.prior_stage.lr_decay, profile.vqvae_stage.lr_decay) == ("linear", "cosine")
