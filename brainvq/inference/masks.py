"""Masks over the 32×32 index grid: which sites a prior fills in. The standard masks, a user's
mask read from a PNG or .npy file, and the mapping between sites and pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brainvq.io_utils import RunError


def bottom_half_mask(grid: int = 32) -> torch.Tensor:
    """(grid, grid) bool, True where indices are to be generated."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[grid // 2:] = True
    return mask


def centre_square_mask(grid: int = 32, side: int = 12) -> torch.Tensor:
    """(grid, grid) bool: a side × side square of sites in the middle (10:22 for 32, 12)."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    start = (grid - side) // 2
    mask[start:start + side, start:start + side] = True
    return mask


INPAINT_MASKS = {"bottom_half": bottom_half_mask(), "centre_square": centre_square_mask()}


def load_mask(path: Path, n_codes: int, grid: int = 32, image_size: int = 256) -> torch.Tensor:
    """A user mask → (grid, grid) bool, True where the prior fills in.

    A PNG (white/non-zero = fill) or a .npy array, at index-grid or image resolution; an
    image-resolution mask marks every site whose patch it touches. A .npy array holds 0/1, or
    is an index grid: −1 where to fill, valid code indices elsewhere."""
    if not path.is_file():
        raise RunError(f"mask {path} not found")
    try:
        array = (np.load(path) if path.suffix == ".npy"
                 else np.asarray(Image.open(path).convert("L")))
    except Exception as err:  # numpy and PIL raise many kinds
        raise RunError(f"mask {path} cannot be read ({type(err).__name__}); save it as a PNG "
                       "or a .npy array") from err
    if array.shape not in ((grid, grid), (image_size, image_size)):
        raise RunError(f"mask {path} is {array.shape}; it must be {grid}×{grid} (index grid) or "
                       f"{image_size}×{image_size} (image)")
    if path.suffix == ".npy":
        array = _npy_mask(path, array, n_codes)
    marked = np.asarray(array) != 0
    mask = torch.from_numpy(pixels_to_sites(marked, grid) if len(marked) == image_size else marked)
    if not mask.any():
        raise RunError(f"mask {path} marks nothing to inpaint: make the region to fill non-zero")
    return mask


def _npy_mask(path: Path, array: np.ndarray, n_codes: int) -> np.ndarray:
    """0/1 → as is; an index grid (−1 = fill, else a code index) → 1 where −1."""
    values = np.unique(array)
    if np.isin(values, (0, 1)).all():
        return array
    valid = (values == -1) | ((values >= 0) & (values < n_codes) & (values == np.round(values)))
    if not valid.all():
        raise RunError(f"mask {path} holds {values[~valid][0]}: use 0/1, or −1 (fill) and code "
                       f"indices in [0, {n_codes})")
    return array == -1


def random_rectangles(n: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """(n, grid, grid) bool: one hole per grid, a rectangle whose sides are random between an
    eighth and three quarters of the grid (4 and 24 sites of 32), at a random place."""
    sides = torch.randint(max(1, grid // 8), grid * 3 // 4 + 1, (n, 2), generator=generator)
    corners = (torch.rand(n, 2, generator=generator) * (grid - sides + 1)).long()
    sites = torch.arange(grid)
    rows, cols = ((sites >= corners[:, k, None]) & (sites < (corners + sides)[:, k, None])
                  for k in (0, 1))  # (n, grid) each
    return rows[:, :, None] & cols[:, None, :]


def apply_mask(indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) indices with the (H, W) bool mask's sites set to −1 (to be filled in)."""
    masked = indices.clone()
    masked[:, mask] = -1
    return masked


def given_after_holes(holes: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool holes → (B, H, W) bool: the given sites that come after a hole of their
    grid in raster order, the context a raster-order sampler never sees."""
    flat = holes.flatten(1)
    return ((flat.cumsum(1) > 0) & ~flat).view_as(holes)


def sites_to_pixels(mask: torch.Tensor, image_size: int) -> np.ndarray:
    """(grid, grid) site mask → (image_size, image_size) mask of the sites' patches."""
    patch = image_size // mask.shape[-1]
    return mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()


def site_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """(..., S, S) pixel mask → (..., grid, grid): the share of each site's patch marked."""
    patch = mask.shape[-1] // grid
    return mask.reshape(*mask.shape[:-2], grid, patch, grid, patch).mean(axis=(-3, -1))


def pixels_to_sites(mask: np.ndarray, grid: int) -> np.ndarray:
    """(S, S) pixel mask → (grid, grid): the sites whose patch holds any marked pixel."""
    return site_coverage(mask, grid) > 0
