"""Shared basics of the slice data: the 256x256 frame and the split names, the in-memory
`SliceSet` and `DatasetError`, parsing slice file names (``case_XXX_slice_Y.nii.png`` or
``<volume>_slice_Y.png``), and centre-fitting an image to the frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainvq.positions import unknown_positions

IMAGE_SIZE = 256
SPLITS = ("train", "validate", "test")

_SLICE_NAMES = (
    re.compile(r"case_(?P<case>[0-9A-Za-z]+)_slice_(?P<slice>\d+)(?:\.nii)?\.png"),  # OASIS PNGs
    re.compile(r"(?P<case>.+)_slice_(?P<slice>\d+)\.png"),  # slices of a volume: no ".nii"
)


class DatasetError(ValueError):
    """A data root, split folder or image file that cannot be used; the message says the fix."""


@dataclass(frozen=True)
class SliceSet:
    """One split in memory: uint8 `images` (N, 256, 256) and their file `names`, in order."""

    images: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


# ---------------------------------------------------------------- file names


def slice_index(name: str | Path) -> int | None:
    """Slice number Y of ``case_XXX_slice_Y.nii.png`` or ``<volume>_slice_Y.png``; else None."""
    match = _parse_slice_name(name)
    return int(match["slice"]) if match else None


def case_id(name: str | Path) -> str | None:
    """Case XXX of ``case_XXX_slice_Y.nii.png`` as written (e.g. "001"), or the volume of
    ``<volume>_slice_Y.png``; None for other names."""
    match = _parse_slice_name(name)
    return match["case"] if match else None


def evenly_spaced(n_total: int, n: int) -> torch.Tensor:
    """Up to n indices spread evenly over range(n_total), first and last included."""
    return torch.linspace(0, n_total - 1, min(n, n_total)).round().long().unique()


def relative_positions(names: list[str]) -> torch.Tensor:
    """(N,) float32: each slice's relative axial position in its case or volume, 0 for its
    lowest slice and 1 for its highest, from `case_X_slice_Y` / `<volume>_slice_<z>` names; NaN
    where a name carries no slice number or its case has a single slice."""
    keys = [(case_id(name), slice_index(name)) for name in names]
    extent: dict[str, tuple[int, int]] = {}
    for case, index in keys:
        if case is not None and index is not None:
            low, high = extent.get(case, (index, index))
            extent[case] = (min(low, index), max(high, index))
    positions = unknown_positions(len(names))
    for i, (case, index) in enumerate(keys):
        if case in extent and extent[case][1] > extent[case][0]:
            low, high = extent[case]
            positions[i] = (index - low) / (high - low)
    return positions


def _parse_slice_name(name: str | Path) -> re.Match | None:
    name = Path(name).name
    return next((match for p in _SLICE_NAMES if (match := p.fullmatch(name))), None)


def natural_key(name: str) -> tuple:
    """Sort key that compares the numbers inside a name by value: slice_2 before slice_10."""
    # re.split with a group alternates text and digits, so equal positions hold equal types.
    parts = re.split(r"(\d+)", name)
    return (*(int(part) if part.isdigit() else part.lower() for part in parts), name)


# ---------------------------------------------------------------- pixels and frame


def to_unit(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W) → float (B, H, W) in [0, 1]."""
    return (images.float() / 255).numpy()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] → uint8, as they would be saved to 8-bit PNG."""
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def centre_fit(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Centre-crop and/or zero-pad (..., H, W) to (..., size, size)."""
    (src_r, dst_r, rows), (src_c, dst_c, cols) = (centred_span(n, size) for n in image.shape[-2:])
    fitted = np.zeros((*image.shape[:-2], size, size), dtype=image.dtype)
    fitted[..., dst_r : dst_r + rows, dst_c : dst_c + cols] = image[
        ..., src_r : src_r + rows, src_c : src_c + cols
    ]
    return fitted


def centred_span(length: int, size: int) -> tuple[int, int, int]:
    """(source start, destination start, count) that centres `length` pixels within `size`."""
    count = min(length, size)
    return (length - count) // 2, (size - count) // 2, count
