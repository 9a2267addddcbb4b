"""Load PNG/JPEG split folders of OASIS-style brain MRI slices into memory, and compute the
training set's normalisation.

Layouts accepted for a data root (see `find_split_dirs`):

* OASIS as distributed for the course: folders ``keras_png_slices_train``,
  ``keras_png_slices_validate`` and ``keras_png_slices_test`` of 256x256 8-bit
  grayscale PNGs named ``case_XXX_slice_Y.nii.png``. The ``keras_png_slices_seg_*``
  folders beside them hold segmentation masks and are ignored.
* Folders ``train/``, ``validate/`` (or ``val/``) and ``test/`` of PNG/JPEG images.
* Either layout one folder down, e.g. the ``keras_png_slices_data/`` folder that
  the OASIS zip unpacks to.
* A folder of 3-D volumes, searched recursively: NIfTI (``.nii``, ``.nii.gz``) and
  Analyze ``.hdr``/``.img`` pairs, like the OASIS-1 raw release. They are sliced
  axially and split by subject; see volumes.py. Used when the root holds
  no split folders. Split folders may also hold volumes instead of images.

Files that are not .png/.jpg/.jpeg, and hidden files, are skipped. Each split is
sorted in natural order (case number, then slice number: slice_2 before slice_10).

Image policy (one warning per split when a rule had to be applied):

* Colour and palette images (RGB, RGBA, P, ...) are converted to luminance with
  PIL's "L" mode; alpha is dropped. 16-bit, 32-bit and float images are rescaled
  linearly so that 0 stays 0 and the image's maximum becomes 255.
* Images that are not 256x256 are centre-cropped and/or zero-padded, each axis
  separately, to 256x256. Nothing is resampled, so the pixel spacing is kept;
  when cropping or padding an odd number of pixels the extra one goes at the
  bottom/right.

3-D volumes are read and sliced by volumes.py; the offline demo set is built by demo_data.py.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from brainvq.data.slices import IMAGE_SIZE, SPLITS, DatasetError, SliceSet, centre_fit, natural_key
from brainvq.data.volumes import (
    VOLUME_SPACING_MM,
    find_volumes,
    iter_volume_files,
    load_volume_splits,
    load_volumes,
    volume_names,
)

OASIS_SPLIT_DIRS = {split: (f"keras_png_slices_{split}",) for split in SPLITS}
PLAIN_SPLIT_DIRS = {"train": ("train",), "validate": ("validate", "val"), "test": ("test",)}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
PROGRESS_MIN_FILES = 2000  # below this, loading takes about a second: no bar
_LAYOUT_HELP = (
    "Expected keras_png_slices_train/, keras_png_slices_validate/, keras_png_slices_test/ "
    "(OASIS) or train/, validate/ (or val/), test/, or a folder of 3-D volumes "
    "(.nii, .nii.gz, .hdr/.img)."
)


# ---------------------------------------------------------------- layouts


def find_split_dirs(root: str | Path) -> dict[str, Path]:
    """Folders of the "train", "validate" and "test" splits under `root`, in either layout."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(
            f"Data root {root} does not exist. Pass the folder that holds the split folders, "
            f"or build the demo set with build_demo_dataset(). {_LAYOUT_HELP}"
        )
    if not root.is_dir():
        raise DatasetError(
            f"Data root {root} is a file; pass the folder that holds the split folders. "
            f"{_LAYOUT_HELP}"
        )

    found, missing = _match_layout(root)
    if found and not missing:
        return found
    if not found:
        nested = [
            dirs
            for child in _subdirs(root)
            for dirs, gaps in [_match_layout(child)]
            if dirs and not gaps
        ]
        if len(nested) == 1:
            return nested[0]

    if not found and next(iter_volume_files(root), None) is not None:
        raise DatasetError(
            f"Data root {root} holds 3-D volumes, not split folders: load it with "
            "load_splits(root), which slices the volumes and splits them by subject."
        )
    present = ", ".join(f"{child.name}/" for child in _subdirs(root)) or "no folders"
    absent = f" Missing: {', '.join(missing)}." if found else ""
    raise DatasetError(
        f"Data root {root} does not hold the split folders.{absent} Found: {present}. "
        f"{_LAYOUT_HELP} "
        "Point the loader at the folder that holds them."
    )


def _match_layout(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Split folders of the best-matching layout in `folder`, and the names that layout misses."""
    best: tuple[dict[str, Path], list[str]] | None = None
    for layout in (OASIS_SPLIT_DIRS, PLAIN_SPLIT_DIRS):
        found, missing = {}, []
        for split, names in layout.items():
            hit = next((folder / name for name in names if (folder / name).is_dir()), None)
            if hit is None:
                missing.append(" or ".join(f"{name}/" for name in names))
            else:
                found[split] = hit
        if best is None or len(found) > len(best[0]):
            best = (found, missing)
    return best


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        (child for child in folder.iterdir() if child.is_dir()), key=lambda p: natural_key(p.name)
    )


def list_image_files(folder: Path) -> list[Path]:
    """Image files in `folder`, naturally sorted; others and hidden ones (.DS_Store) are skipped."""
    files = [
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not path.name.startswith(".")
        and path.is_file()
    ]
    return sorted(files, key=lambda path: natural_key(path.name))


# ---------------------------------------------------------------- images


def read_grayscale(path: Path) -> tuple[np.ndarray, str | None]:
    """Decode `path` to uint8 (H, W), and its original mode if that was not 8-bit grayscale."""
    try:
        with Image.open(path) as image:
            image.load()
    # PIL raises any of these for corrupt or truncated files.
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"Cannot read image {path}: {error}. Delete or replace this file."
        ) from error
    if image.mode == "L":
        return np.asarray(image), None
    return to_grayscale_uint8(image), image.mode


def to_grayscale_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image as uint8 (H, W): colour to luminance, wider values scaled by their maximum."""
    if image.mode.startswith(("I", "F")):
        values = np.clip(np.asarray(image, dtype=np.float64), 0, None)
        peak = values.max()
        if peak > 0:
            values *= 255 / peak
        return np.rint(values).astype(np.uint8)
    return np.asarray(image.convert("L"))


def load_split(
    folder: str | Path, progress: bool | None = None, spacing: float = VOLUME_SPACING_MM
) -> SliceSet:
    """Read every image in `folder` into uint8 (N, 256, 256); by default, a bar for big splits.

    A folder without images but with 3-D volumes (found recursively) gives their slices,
    resampled to `spacing` mm (0: each file's grid; see `load_volumes`).
    """
    folder = Path(folder)
    files = list_image_files(folder)
    if not files and (volumes := find_volumes(folder)):
        names = volume_names(volumes, folder)
        return load_volumes(volumes, names, progress, folder.name, spacing)
    if not files:
        raise DatasetError(
            f"Split folder {folder} holds no .png/.jpg/.jpeg images. Put this split's images "
            "there, or point the loader at another data root."
        )
    show_bar = len(files) >= PROGRESS_MIN_FILES if progress is None else progress
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # (N, H, W)
    converted_modes: Counter[str] = Counter()
    refitted = 0
    bar = tqdm(files, desc=f"Loading {folder.name}", unit="img", disable=not show_bar)
    for i, path in enumerate(bar):
        image, mode = read_grayscale(path)
        if mode is not None:
            converted_modes[mode] += 1
        if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
            refitted += 1
            image = centre_fit(image)
        images[i] = image

    if converted_modes:
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(converted_modes.items()))
        warnings.warn(f"{folder}: converted images to 8-bit grayscale ({modes}).", stacklevel=2)
    if refitted:
        warnings.warn(
            f"{folder}: {refitted} of {len(files)} images were not {IMAGE_SIZE}x{IMAGE_SIZE}; "
            "centre-cropped/zero-padded them.",
            stacklevel=2,
        )
    return SliceSet(torch.from_numpy(images), [path.name for path in files])


def load_splits(
    root: str | Path,
    progress: bool | None = None,
    splits: tuple[str, ...] = SPLITS,
    spacing: float = VOLUME_SPACING_MM,
) -> dict[str, SliceSet]:
    """Load the "train", "validate" and "test" splits under `root`, or only those in `splits`.

    Split folders (`find_split_dirs`) come first; a root without them but with 3-D volumes is
    split by subject (`load_volume_splits`). Volumes are resampled to `spacing` mm (0: each
    file's grid); images are not.
    """
    if unknown := set(splits) - set(SPLITS):
        raise ValueError(f"Unknown splits {sorted(unknown)}; choose from {SPLITS}")
    try:
        folders = find_split_dirs(root)
    except DatasetError:
        volumes = find_volumes(root) if Path(root).expanduser().is_dir() else []
        if not volumes:
            raise
        return load_volume_splits(Path(root).expanduser(), volumes, progress, splits, spacing)
    return {split: load_split(folders[split], progress, spacing) for split in splits}


# ---------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalisation:
    """Training-set mean and std of pixel values scaled to [0, 1]."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"Normalisation needs a finite mean and a positive std, got {self}")

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) or (N, 1, H, W) -> float (N, 1, H, W) in torch's default dtype
        (float32 unless set), training set at mean 0 std 1."""
        if images.dtype != torch.uint8:
            raise TypeError(f"normalise expects uint8 images, got {images.dtype}")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(
                f"normalise expects (N, H, W) or (N, 1, H, W), got {tuple(images.shape)}"
            )
        return (images.to(torch.get_default_dtype()) / 255 - self.mean) / self.std

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalise`, clamped to [0, 1]; same shape and float dtype."""
        return (images * self.std + self.mean).clamp(0, 1)

    def to_dict(self) -> dict[str, float]:
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Normalisation:
        return cls(mean=float(values["mean"]), std=float(values["std"]))


def compute_normalisation(images: torch.Tensor) -> Normalisation:
    """Exact mean and std of uint8 `images` (any shape) scaled to [0, 1], from a histogram."""
    if images.dtype != torch.uint8 or images.numel() == 0:
        raise ValueError(
            "compute_normalisation expects a non-empty uint8 tensor, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    counts = torch.zeros(256, dtype=torch.float64)
    for chunk in images.reshape(-1).split(1 << 22):  # bounds the int64 copy bincount needs to 32 MB
        counts += torch.bincount(chunk.long(), minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * levels).sum() / counts.sum()
    variance = (counts * (levels - mean) ** 2).sum() / counts.sum()
    return Normalisation(mean=mean.item(), std=variance.sqrt().item())
