"""Seed-style baselines, kept only to measure this project's models against them."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
