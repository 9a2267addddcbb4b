"""Seed-style baselines, kept only to measure this project's models against them: the seed
report's VQ-VAE with its data path and training epoch, and its PixelCNN prior."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from modules import PixelCNN, PriorConfig

SEED_DILATIONS = (1, 2, 1, 4, 1, 2, 1)  # the seed report's seven gated layers


class ScaledScalarInput(nn.Module):
    """The seed's input: each index divided by K − 1 and fed as one number per site."""

    def __init__(self, n_codes: int, channels: int) -> None:
        super().__init__()
        self.n_codes = n_codes
        self.project = nn.Linear(1, channels)

    @property
    def weight(self) -> torch.Tensor:
        """(K, C): what each code is fed as, a linear function of k / (K − 1), laid out like
        nn.Embedding's table so the samplers can use it alike."""
        codes = torch.arange(self.n_codes, device=self.project.weight.device)
        return self.project(codes.unsqueeze(1).to(self.project.weight.dtype) / (self.n_codes - 1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) → (B, H, W, C), the layout nn.Embedding returns."""
        return F.embedding(indices, self.weight)


class SeedStylePixelCNN(PixelCNN):
    """Gated PixelCNN as in the seed report: scalar input, dilations 1,2,1,4,1,2,1, no
    position biases. The gated layers and head are this project's, so a comparison isolates
    the input encoding, depth/dilations and position conditioning."""

    def __init__(self, n_codes: int, channels: int) -> None:
        super().__init__(PriorConfig(n_codes=n_codes, channels=channels,
                                     dilations=SEED_DILATIONS, grid_size=0))
        self.embedding = ScaledScalarInput(n_codes, channels)


class PngSlices(torch.utils.data.Dataset):
    """The seed's data path: each slice decoded from its PNG file whenever it is asked for."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255
        return torch.from_numpy(pixels).unsqueeze(0)  # (1, H, W) in [0, 1]


def _conv_bn_relu(c_in: int, c_out: int, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return [conv(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class SeedStyleVQVAE(nn.Module):
    """The seed report's VQ-VAE: 1→16→32→D stride-2 convolutions with BatchNorm + ReLU, a
    gradient-trained codebook searched by torch.cdist, and a mirrored transposed decoder
    that ends in BatchNorm. Images in [0, 1]; (B, 1, 256, 256) → (B, D, 32, 32)."""

    def __init__(self, dim: int = 32, n_codes: int = 256, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.encoder = nn.Sequential(*_conv_bn_relu(1, 16), *_conv_bn_relu(16, 32),
                                     *_conv_bn_relu(32, dim))
        self.codebook = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.codebook.weight, -1 / n_codes, 1 / n_codes)
        self.decoder = nn.Sequential(*_conv_bn_relu(dim, 32, True), *_conv_bn_relu(32, 16, True),
                                     nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
                                     nn.BatchNorm2d(1))

    def quantise(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, H, W) → straight-through quantised latents and the VQ loss."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        codebook = self.codebook.weight.unsqueeze(0).repeat(b, 1, 1)  # (B, K, D), as the seed
        chosen = self.codebook(torch.cdist(flat, codebook).argmin(-1))  # (B, H·W, D)
        chosen = chosen.view(b, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(chosen, z.detach()) + self.beta * F.mse_loss(z, chosen.detach())
        return z + (chosen - z).detach(), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (B, 1, H, W) and VQ loss."""
        quantised, vq_loss = self.quantise(self.encoder(x))
        return self.decoder(quantised), vq_loss


def train_seed_style_epoch(model: SeedStyleVQVAE, loader: torch.utils.data.DataLoader,
                           optimiser: torch.optim.Optimizer, device: torch.device) -> None:
    """One epoch as the seed trains: MSE + VQ loss, whole slices decoded from PNG per item."""
    model.train()
    for x in loader:
        x = x.to(device)
        reconstruction, vq_loss = model(x)
        loss = F.mse_loss(reconstruction, x) + vq_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
