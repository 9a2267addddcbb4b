"""The training losses add exactly what they say: the VQ-VAE's MSE + the quantiser's loss (+ the
weighted L1 and 1 − SSIM terms), the prior's the mean bits per index at the given positions; and
their gradients are those of that sum. float64, compared with tolerances."""
import math

import pytest
import torch
import torch.nn.functional as F

from brainvq.config import StageSettings
from brainvq.evaluation.metrics import ssim_torch
from brainvq.training.stages import prior_loss, vqvae_losses
from dataset import Normalisation
from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig

CLOSE = {"rtol": 1e-9, "atol": 1e-12}
NORM = Normalisation(mean=0.2, std=0.3)


def small_vqvae(ema: bool) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(hidden=(4, 4, 8), n_res_blocks=1, embedding_dim=4, n_codes=16,
                             ema=ema)).double().eval()


def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, dtype=torch.float64, generator=generator)


def settings(**weights: float) -> StageSettings:
    return StageSettings(epochs=1, batch_size=2, lr=1e-3, **weights)


def by_hand(model: VQVAE, x: torch.Tensor, l1: float = 0.0, ssim: float = 0.0) -> torch.Tensor:
    out = model(x)
    loss = ((out.reconstruction - x) ** 2).mean() + out.vq_loss
    loss = loss + l1 * (out.reconstruction - x).abs().mean()
    if ssim:
        unit = [t * NORM.std + NORM.mean for t in (x, out.reconstruction)]
        loss = loss + ssim * (1 - ssim_torch(*unit))
    return loss


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_vqvae_loss_is_the_reconstruction_mse_plus_the_quantiser_loss(ema):
    model, x = small_vqvae(ema), images()
    out = model(x)
    losses = vqvae_losses(model, x, settings(), NORM)
    mse = ((out.reconstruction - x) ** 2).mean()
    torch.testing.assert_close(losses["recon"], mse, **CLOSE)
    torch.testing.assert_close(losses["loss"], mse + out.vq_loss, **CLOSE)
    torch.testing.assert_close(losses["codebook"], out.codebook_loss, **CLOSE)
    torch.testing.assert_close(losses["commitment"], out.commitment_loss, **CLOSE)
    assert out.vq_loss > 0
    expected = gradients(model, by_hand(model, x))
    got = gradients(model, losses["loss"])
    assert len(got) == len(expected) == len([p for p in model.parameters() if p.requires_grad])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


def test_vqvae_loss_adds_the_weighted_l1_and_one_minus_ssim_terms():
    model, x = small_vqvae(False), images()
    weighted = vqvae_losses(model, x, settings(l1_weight=0.7, ssim_weight=0.4), NORM)
    plain = vqvae_losses(model, x, settings(), NORM)
    reconstruction = model(x).reconstruction
    l1 = (reconstruction - x).abs().mean()
    one_minus_ssim = 1 - ssim_torch(x * 0.3 + 0.2, reconstruction * 0.3 + 0.2)
    torch.testing.assert_close(weighted["loss"] - plain["loss"], 0.7 * l1 + 0.4 * one_minus_ssim,
                               **CLOSE)
    torch.testing.assert_close(weighted["recon"], plain["recon"], **CLOSE)  # the MSE alone
    expected = gradients(model, by_hand(model, x, l1=0.7, ssim=0.4))
    for a, b in zip(gradients(model, weighted["loss"]), expected, strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


def conditioned_prior() -> PixelCNN:
    torch.manual_seed(0)
    model = PixelCNN(PriorConfig(n_codes=9, channels=6, dilations=(1, 2), grid_size=8,
                                 slice_bins=3)).double()
    with torch.no_grad():
        model.slice_embedding.weight.normal_(0, 1)
        model.head[-1].weight.mul_(4)
    return model


def test_prior_loss_is_the_mean_bits_per_index_at_the_given_positions():
    model = conditioned_prior()
    grids = torch.randint(9, (2, 5, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([0.15, float("nan")], dtype=torch.float64)
    loss = prior_loss(model, grids, positions)
    log_p = F.log_softmax(model(grids, positions), dim=1).gather(1, grids[:, None])
    expected = -log_p.mean() / math.log(2)
    torch.testing.assert_close(loss, expected, **CLOSE)
    torch.testing.assert_close(loss, model.bits_per_index(grids, positions), **CLOSE)
    assert not torch.isclose(prior_loss(model, grids), loss)  # the positions are used
    got = gradients(model, loss)
    assert len(got) == len(list(model.parameters()))  # every weight learns from it
    for a, b in zip(got, gradients(model, expected), strict=True):
        torch.testing.assert_close(a, b, **CLOSE)
