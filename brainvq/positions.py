"""Relative slice positions, the prior's condition: 0 for the lowest slice of a volume, 1 for the
highest, NaN where a slice's position is unknown (the prior then uses its "unknown" vector)."""
from __future__ import annotations

import torch


def unknown_positions(n: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) positions that are all unknown, float32 on the CPU (or of `like`'s dtype and
    device)."""
    if like is None:
        return torch.full((n,), float("nan"))
    return like.new_full((n,), float("nan"))
