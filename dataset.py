"""Load OASIS-style brain MRI slices into memory, and build an offline demo set.

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
  axially and split by subject; see `load_volume_splits`. Used when the root holds
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

Volume policy (`load_volume_splits`):

* Volumes are reoriented to RAS+ with ``nibabel.as_closest_canonical`` (axes permuted
  and flipped) and cut into axial slices, bottom up, shown like the PNG
  slices (anterior at the top, the subject's right on the left) and centre-padded or
  cropped to 256x256. Analyze headers hold no orientation: nibabel reads them as
  radiological (LAS). Trailing dimensions of size 1 are dropped (OASIS-1's Analyze files
  are 176x208x176x1); 4-D series are refused.
* Voxels are resampled linearly (``scipy.ndimage``) to `VOLUME_SPACING_MM` (1 mm)
  isotropic, so a pixel is 1 mm whatever the scan and the frame spans 256 mm; volumes
  already on that grid (within 0.001 mm, like OASIS-1's) are untouched, and ``spacing=0``
  keeps each file's grid. When the frame still cuts off brain, a warning per volume says
  how many mm on which axis and the ``--spacing`` that fits it.
* Slices cover the brain's axial extent: those with at least `MIN_SLICE_AREA` of the
  largest slice's brain area, ends trimmed. Each is named ``<volume>_slice_<z>.png``
  with z its axial index in the reoriented, resampled volume.
* Intensities scale per volume: 0 stays 0, the 99.5th percentile of the non-zero voxels
  becomes 255, and values are clipped to 0..255.
* Volumes are split by subject (an OASIS ``OAS1_0001`` or BIDS ``sub-01`` in the path,
  else one subject per volume): a shuffle with a fixed seed, then 10% validate, 10% test
  (at least one each) and the rest train. Fewer than 3 subjects is an error.
* In the OASIS-1 release, only the ``*_masked_gfc`` volumes are used (see `find_volumes`).

The demo set (`build_demo_dataset`) is made offline from the MNI ICBM152 2009a
template that ships inside nilearn's package; see that function.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
SPLITS = ("train", "validate", "test")
OASIS_SPLIT_DIRS = {split: (f"keras_png_slices_{split}",) for split in SPLITS}
PLAIN_SPLIT_DIRS = {"train": ("train",), "validate": ("validate", "val"), "test": ("test",)}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
PROGRESS_MIN_FILES = 2000  # below this, loading takes about a second: no bar

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
VOLUME_HOLDOUT = {"validate": 0.1, "test": 0.1}  # fractions of the subjects; the rest train
VOLUME_SPLIT_SEED = 0
BRIGHT_PERCENTILE = 99.5  # of a volume's non-zero voxels: this level becomes 255
EXTENT_LEVEL = 0.1  # of the bright level: voxels above it count as brain when finding the extent
MIN_SLICE_AREA = 0.05  # of the largest axial brain area: end slices with less are dropped
PROGRESS_MIN_VOLUMES = 20
VOLUME_SPACING_MM = 1.0  # volumes are resampled to this isotropic voxel size; 0 keeps their grid
SPACING_TOLERANCE_MM = 1e-3  # voxel sizes this close to the target are left unresampled
OASIS_VOLUME = "_masked_gfc"  # OASIS-1's skull-stripped, bias-corrected, atlas-registered volume
_SUBJECT_ID = re.compile(r"OAS\d_\d{4}|(?<![0-9A-Za-z])sub-[0-9A-Za-z]+")  # OASIS, BIDS

DEMO_TRAIN_SUBJECTS = 40
DEMO_VALIDATE_SUBJECTS = 5
DEMO_TEST_SUBJECTS = 5
DEMO_SLICES_PER_SUBJECT = 32
DEMO_SLICE_RANGE = (0.3, 0.85)  # part of the brain's axial extent sliced, bottom to top
DEMO_VERSION = 1  # bump when the generator changes, so old demo sets are rebuilt
DEMO_MARKER = ".complete"
DEMO_STAGING = ".building"
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

_SLICE_NAMES = (
    re.compile(r"case_(?P<case>[0-9A-Za-z]+)_slice_(?P<slice>\d+)(?:\.nii)?\.png"),  # OASIS PNGs
    re.compile(r"(?P<case>.+)_slice_(?P<slice>\d+)\.png"),  # slices of a volume: no ".nii"
)
_LAYOUT_HELP = (
    "Expected keras_png_slices_train/, keras_png_slices_validate/, keras_png_slices_test/ "
    "(OASIS) or train/, validate/ (or val/), test/, or a folder of 3-D volumes "
    "(.nii, .nii.gz, .hdr/.img)."
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


def _parse_slice_name(name: str | Path) -> re.Match | None:
    name = Path(name).name
    return next((match for p in _SLICE_NAMES if (match := p.fullmatch(name))), None)


def natural_key(name: str) -> tuple:
    """Sort key that compares the numbers inside a name by value: slice_2 before slice_10."""
    # re.split with a group alternates text and digits, so equal positions hold equal types.
    parts = re.split(r"(\d+)", name)
    return (*(int(part) if part.isdigit() else part.lower() for part in parts), name)


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


def centre_fit(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Centre-crop and/or zero-pad (..., H, W) to (..., size, size)."""
    (src_r, dst_r, rows), (src_c, dst_c, cols) = (_centred_span(n, size) for n in image.shape[-2:])
    fitted = np.zeros((*image.shape[:-2], size, size), dtype=image.dtype)
    fitted[..., dst_r : dst_r + rows, dst_c : dst_c + cols] = image[
        ..., src_r : src_r + rows, src_c : src_c + cols
    ]
    return fitted


def _centred_span(length: int, size: int) -> tuple[int, int, int]:
    """(source start, destination start, count) that centres `length` pixels within `size`."""
    count = min(length, size)
    return (length - count) // 2, (size - count) // 2, count


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


# ---------------------------------------------------------------- volumes


def volume_stem(path: Path) -> str:
    """File name without its volume suffix: ``a.nii.gz`` -> ``a``; other names unchanged."""
    name = path.name
    suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), "")
    return name[: len(name) - len(suffix)]


def iter_volume_files(root: Path) -> Iterator[Path]:
    """Files with a volume suffix under `root`, recursively; hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and volume_stem(path) != name:
                yield path


def find_volumes(root: Path) -> list[Path]:
    """3-D volumes under `root`, recursively, in natural order of their paths.

    An Analyze pair counts once, as its .hdr. Each OASIS-1 session also holds raw scans,
    intermediate stages and segmentations: when ``*_masked_gfc`` volumes are present, only
    those are used.
    """
    files = list(iter_volume_files(root))
    headers = {_without_suffix(path) for path in files if path.suffix.lower() == ".hdr"}
    volumes = [
        path
        for path in files
        if not (path.suffix.lower() == ".img" and _without_suffix(path) in headers)
    ]
    volumes.sort(key=lambda path: natural_key(path.relative_to(root).as_posix()))
    oasis = [path for path in volumes if volume_stem(path).endswith(OASIS_VOLUME)]
    if oasis and len(oasis) < len(volumes):
        log.info(
            "%s: using the %d *%s volumes (OASIS-1), skipping %d other volumes",
            root,
            len(oasis),
            OASIS_VOLUME,
            len(volumes) - len(oasis),
        )
        return oasis
    return volumes


def _without_suffix(path: Path) -> str:
    return path.with_suffix("").as_posix().lower()


def volume_names(volumes: list[Path], root: Path) -> list[str]:
    """Each volume's file stem; where stems repeat, its path under `root` joined by "_"."""
    stems = [volume_stem(path) for path in volumes]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    return [
        "_".join((*path.relative_to(root).parent.parts, stem)) if stem in repeated else stem
        for path, stem in zip(volumes, stems, strict=True)
    ]


def subject_id(volume: Path, root: Path, name: str) -> str:
    """OASIS (``OAS1_0001``) or BIDS (``sub-01``) subject in the volume's path under `root`;
    else `name`, one subject per volume."""
    match = _SUBJECT_ID.search(volume.relative_to(root).as_posix())
    return match[0] if match else name


def split_subjects(subjects: list[str], seed: int = VOLUME_SPLIT_SEED) -> dict[str, list[str]]:
    """Distinct `subjects` shuffled with `seed`: 10% validate and 10% test (at least one each),
    the rest train."""
    unique = sorted(set(subjects), key=natural_key)
    if len(unique) < len(SPLITS):
        raise ValueError(f"Need at least {len(SPLITS)} subjects to split, got {len(unique)}")
    shuffled = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n_validate, n_test = (max(1, round(share * len(unique))) for share in VOLUME_HOLDOUT.values())
    n_train = len(unique) - n_validate - n_test
    return {
        "train": shuffled[:n_train],
        "validate": shuffled[n_train : n_train + n_validate],
        "test": shuffled[n_train + n_validate :],
    }


def load_volume_splits(
    root: Path,
    volumes: list[Path],
    progress: bool | None = None,
    splits: tuple[str, ...] = SPLITS,
    spacing: float = VOLUME_SPACING_MM,
) -> dict[str, SliceSet]:
    """Slice the `volumes` found under `root` at `spacing` mm (`load_volumes`) and split them
    by subject (`split_subjects`)."""
    names = volume_names(volumes, root)
    subjects = [subject_id(path, root, name) for path, name in zip(volumes, names, strict=True)]
    n_subjects = len(set(subjects))
    if n_subjects < len(SPLITS):
        raise DatasetError(
            f"Data root {root} holds {len(volumes)} volume(s) of {n_subjects} subject(s); "
            f"splitting by subject needs at least {len(SPLITS)}, one each for train, validate "
            "and test. Add volumes, or put them in train/, validate/ and test/ folders yourself."
        )
    members = split_subjects(subjects)
    show_bar = len(volumes) >= PROGRESS_MIN_VOLUMES if progress is None else progress
    loaded = {}
    for split in splits:
        wanted = set(members[split])
        chosen = [i for i, subject in enumerate(subjects) if subject in wanted]
        loaded[split] = load_volumes(
            [volumes[i] for i in chosen], [names[i] for i in chosen], show_bar, split, spacing
        )
    return loaded


def load_volumes(
    volumes: list[Path],
    names: list[str],
    progress: bool | None = None,
    label: str = "volumes",
    spacing: float = VOLUME_SPACING_MM,
) -> SliceSet:
    """Axial slices (`slice_volume`) of each volume in order, named ``<name>_slice_<z>.png``,
    resampled to `spacing` mm isotropic voxels (0: each file's own grid)."""
    if not (np.isfinite(spacing) and spacing >= 0):
        raise ValueError(
            f"spacing must be 0 (keep each volume's grid) or a size in mm, got {spacing}"
        )
    show_bar = len(volumes) >= PROGRESS_MIN_VOLUMES if progress is None else progress
    bar = tqdm(volumes, desc=f"Loading {label}", unit="volume", disable=not show_bar)
    stacks, slice_names = [], []
    for path, name in zip(bar, names, strict=True):
        slices, first = slice_volume(path, spacing)
        stacks.append(slices)
        slice_names += [f"{name}_slice_{first + k}.png" for k in range(len(slices))]
    return SliceSet(torch.from_numpy(np.concatenate(stacks)), slice_names)


def slice_volume(path: Path, spacing: float = VOLUME_SPACING_MM) -> tuple[np.ndarray, int]:
    """`volume_slices` of the volume at `path` resampled to `spacing` mm (0: its own grid);
    warns when the frame cuts off brain."""
    voxels, voxel_mm = read_volume(path)
    volume, voxel_mm = resample(voxels, voxel_mm, spacing)
    slices, first, extent_mm, cut_mm = volume_slices(volume, voxel_mm[:2])
    if any(cut_mm):
        warnings.warn(_cut_message(path, extent_mm, cut_mm, voxel_mm[:2]), stacklevel=2)
    return slices, first


def _cut_message(
    path: Path,
    extent_mm: tuple[float, float],
    cut_mm: tuple[float, float],
    pixel_mm: tuple[float, float],
) -> str:
    """What the frame cut off the brain of the volume at `path`, and the spacing that fits it."""
    axes = ("left-right", "anterior-posterior")
    cuts = [f"{cut:.0f} mm {axis}" for axis, cut in zip(axes, cut_mm, strict=True) if cut]
    frame = " x ".join(f"{IMAGE_SIZE * mm:.0f}" for mm in pixel_mm)
    fits = np.ceil(max(extent_mm) / IMAGE_SIZE * 10) / 10  # mm per pixel, rounded up to 0.1
    return (
        f"{path}: the brain spans {extent_mm[0]:.0f} x {extent_mm[1]:.0f} mm in-plane but the "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} frame holds {frame} mm, so {' and '.join(cuts)} of it were "
        f"cut off. Pass --spacing {fits:.1f} or more (the frame spans {IMAGE_SIZE} x MM mm per "
        "side) to keep the whole brain."
    )


def read_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """float32 (X, Y, Z) voxels of the volume at `path`, reoriented to RAS+ (nibabel's canonical),
    and their size in mm along X, Y and Z.

    Analyze headers hold no orientation: nibabel takes them as radiological (LAS) storage.
    """
    import nibabel  # only volume roots and the demo need it

    errors = (
        nibabel.filebasedimages.ImageFileError,
        nibabel.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
    )
    try:
        image = nibabel.load(path)
    except errors as error:
        raise _unreadable(path, error) from error
    if len(image.shape) < 3 or any(n != 1 for n in image.shape[3:]):
        raise DatasetError(
            f"Volume {path} has shape {image.shape}; expected a 3-D volume (X, Y, Z), which may "
            "end in dimensions of size 1. A 4-D series cannot be sliced as one brain: split it "
            "into 3-D volumes (nibabel.four_to_three) or move it out of the data root."
        )
    try:
        image = nibabel.as_closest_canonical(image)
        voxels = image.get_fdata(dtype=np.float32)
    except errors as error:
        raise _unreadable(path, error) from error
    voxels = np.nan_to_num(voxels.reshape(voxels.shape[:3]), nan=0, posinf=0, neginf=0)
    if not (voxels > 0).any():
        raise DatasetError(
            f"Volume {path} has no voxel above 0, so no brain to slice. Delete it or move it "
            "out of the data root."
        )
    voxel_mm = nibabel.affines.voxel_sizes(image.affine)  # the header's zooms, in RAS order
    return voxels, tuple(float(mm) for mm in voxel_mm)


def resample(
    volume: np.ndarray, voxel_mm: tuple[float, float, float], spacing: float = VOLUME_SPACING_MM
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """`volume`, whose voxels measure `voxel_mm`, resampled linearly to `spacing` mm isotropic
    voxels about its centre, and the new voxel size.

    Unchanged when `spacing` is 0 or within `SPACING_TOLERANCE_MM` of every voxel size.
    """
    if not spacing or np.allclose(voxel_mm, spacing, rtol=0, atol=SPACING_TOLERANCE_MM):
        return volume, voxel_mm
    from scipy.ndimage import affine_transform

    step = spacing / np.asarray(voxel_mm)  # input voxels per output voxel, per axis
    shape = np.maximum(1, np.rint(np.asarray(volume.shape) / step)).astype(int)
    centre = (np.asarray(volume.shape) - 1) / 2 - step * (shape - 1) / 2  # centres coincide
    resampled = affine_transform(
        volume, step, offset=centre, output_shape=tuple(shape), order=1, mode="nearest"
    )
    return resampled, (spacing, spacing, spacing)


def _unreadable(path: Path, error: Exception) -> DatasetError:
    reason = " ".join(str(error).split())  # one line: nibabel's messages can span several
    return DatasetError(
        f"Cannot read volume {path}: {reason}. Replace it with an intact copy or delete it "
        "(an Analyze .hdr and its .img must sit side by side)."
    )


def volume_slices(
    volume: np.ndarray, pixel_mm: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, int, tuple[float, float], tuple[float, float]]:
    """uint8 (K, 256, 256) axial slices of a RAS (X, Y, Z) volume over its brain's extent,
    bottom up; the z index of the first; and the brain's in-plane extent and the part of it
    the frame cut off, in mm (left-right, anterior-posterior) for voxels of `pixel_mm` (X, Y).

    Same view as the PNG slices: anterior at the top, the subject's right on the left. Voxels
    are not resampled. Intensities scale linearly: 0 stays 0 and the `BRIGHT_PERCENTILE` of
    the non-zero voxels becomes 255 (clipped).
    """
    bright = np.percentile(volume[volume > 0], BRIGHT_PERCENTILE)
    brain = volume > EXTENT_LEVEL * bright
    area = brain.sum(axis=(0, 1))  # brain voxels per axial slice
    kept = np.flatnonzero(area >= MIN_SLICE_AREA * area.max())
    first, last = int(kept[0]), int(kept[-1])
    slab = volume[::-1, ::-1, first : last + 1].transpose(2, 1, 0)  # (K, Y, X), flipped in-plane
    scaled = np.clip(np.rint(slab * (255 / bright)), 0, 255).astype(np.uint8)
    inside = brain[::-1, ::-1, first : last + 1]
    spans = [_frame_cut(inside.any(axis=other)) for other in ((1, 2), (0, 2))]  # along X, Y
    extent_mm = tuple(span * mm for (span, _), mm in zip(spans, pixel_mm, strict=True))
    cut_mm = tuple(cut * mm for (_, cut), mm in zip(spans, pixel_mm, strict=True))
    return centre_fit(scaled), first, extent_mm, cut_mm


def _frame_cut(brain: np.ndarray) -> tuple[int, int]:
    """Span of the brain pixels along one axis of a slice, and how many `centre_fit` drops."""
    start, _, count = _centred_span(len(brain), IMAGE_SIZE)
    where = np.flatnonzero(brain)
    span = int(where[-1] - where[0] + 1) if len(where) else 0
    return span, int(brain.sum() - brain[start : start + count].sum())


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


# ---------------------------------------------------------------- demo data


def demo_root() -> Path:
    """Default location of the demo set: ``data/demo_oasis`` beside this file."""
    return Path(__file__).resolve().parent / "data" / "demo_oasis"


def template_dir() -> Path:
    """Folder inside the installed nilearn package that holds the MNI152 2009a template."""
    import nilearn  # only the demo needs it

    return Path(nilearn.__file__).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_template() -> torch.Tensor:
    """MNI152 T1, GM and WM maps cropped to the brain: float32 (3, X, Y, Z) in [0, 1], 1 mm, RAS."""
    import nibabel

    volumes = []
    for name in TEMPLATE_FILES.values():
        path = template_dir() / name
        if not path.is_file():
            raise DatasetError(
                f"{path} is missing. The demo set is made from the MNI152 template that "
                "ships inside nilearn: pip install nilearn."
            )
        volume = nibabel.as_closest_canonical(nibabel.load(path)).get_fdata(dtype=np.float32)
        volumes.append(volume / volume.max())
    # Crop to the brain plus a zero margin: half the memory, and grid_sample pads with zeros anyway.
    brain = np.argwhere(volumes[0] > 0)
    low, high = np.maximum(brain.min(0) - 2, 0), brain.max(0) + 3
    template = np.stack(
        [volume[low[0] : high[0], low[1] : high[1], low[2] : high[2]] for volume in volumes],
        axis=-1,
    )
    # Channels last in memory (X, Y, Z, 3): grid_sample then reads a voxel's three values together,
    # about 3x faster than three separate planes.
    return torch.from_numpy(template).permute(3, 0, 1, 2)


def build_demo_dataset(
    root: str | Path | None = None,
    n_train: int = DEMO_TRAIN_SUBJECTS,
    n_validate: int = DEMO_VALIDATE_SUBJECTS,
    n_test: int = DEMO_TEST_SUBJECTS,
    slices_per_subject: int = DEMO_SLICES_PER_SUBJECT,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build the demo set at `root` (default `demo_root()`) in the OASIS layout, once.

    A complete earlier build with the same settings is reused; other settings rebuild it.

    Each pseudo-subject is the MNI152 template under a random smooth deformation
    (affine plus elastic) and intensity change (GM/WM contrast, gamma, bias field,
    noise inside the brain), sliced axially like OASIS. Cases are numbered from 1
    across train, validate and test in that order, so no subject is in two splits;
    subject ``c`` depends only on (`seed`, ``c``, `slices_per_subject`).
    """
    root = Path(root) if root is not None else demo_root()
    counts = {"train": n_train, "validate": n_validate, "test": n_test}
    if min(counts.values()) < 1 or slices_per_subject < 1:
        raise ValueError(
            "Each split needs at least one subject and one slice, "
            f"got {counts} and {slices_per_subject} slices"
        )
    settings = {
        "version": DEMO_VERSION,
        **counts,
        "slices_per_subject": slices_per_subject,
        "seed": seed,
    }
    if not force and demo_is_complete(root, settings):
        return root
    _check_demo_owns(root)

    start = time.perf_counter()
    log.info(
        "Building the demo set at %s (%d subjects x %d slices)",
        root,
        sum(counts.values()),
        slices_per_subject,
    )
    staging = root / DEMO_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    template = load_template()
    case = 0
    with single_torch_thread():
        for split, n_subjects in counts.items():
            folder = staging / OASIS_SPLIT_DIRS[split][0]
            folder.mkdir(parents=True)
            for _ in range(n_subjects):
                case += 1
                rng = np.random.default_rng([seed, case])
                for k, image in enumerate(demo_subject_slices(template, rng, slices_per_subject)):
                    path = folder / f"case_{case:03d}_slice_{k}.nii.png"
                    Image.fromarray(image).save(path, compress_level=1)

    # Swap the new folders in; until the marker is rewritten, the staging folder marks root as ours.
    (root / DEMO_MARKER).unlink(missing_ok=True)
    for (name,) in OASIS_SPLIT_DIRS.values():
        shutil.rmtree(root / name, ignore_errors=True)
        (staging / name).rename(root / name)
    (root / DEMO_MARKER).write_text(json.dumps(settings))
    staging.rmdir()
    log.info("Built the demo set in %.1f s", time.perf_counter() - start)
    return root


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the caller's setting."""
    # The demo's tensors are a few MB: threads gain little, lose a lot on a busy 2-core machine,
    # and can change the rounding of a few pixels, so one thread also keeps builds identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def demo_is_complete(root: Path, settings: dict) -> bool:
    """True if `root` holds a finished demo build made with `settings`."""
    marker = root / DEMO_MARKER
    if not marker.is_file() or not all(
        (root / name).is_dir() for (name,) in OASIS_SPLIT_DIRS.values()
    ):
        return False
    try:
        return json.loads(marker.read_text()) == settings
    except json.JSONDecodeError:
        return False


def _check_demo_owns(root: Path) -> None:
    """Refuse to replace split folders that a demo build did not make (e.g. the real OASIS data)."""
    ours = (root / DEMO_MARKER).exists() or (root / DEMO_STAGING).exists()
    existing = [name for (name,) in OASIS_SPLIT_DIRS.values() if (root / name).exists()]
    if existing and not ours:
        raise DatasetError(
            f"{root} already holds {', '.join(existing)} not made by build_demo_dataset; "
            "refusing to overwrite them. Pass another root for the demo set, or delete them."
        )


def demo_subject_slices(
    template: torch.Tensor, rng: np.random.Generator, n_slices: int
) -> np.ndarray:
    """One pseudo-subject from `template` (3, X, Y, Z): uint8 (n_slices, 256, 256), bottom up."""
    return demo_subject_with_clean(template, rng, n_slices)[0]


def demo_subject_with_clean(
    template: torch.Tensor, rng: np.random.Generator, n_slices: int
) -> tuple[np.ndarray, np.ndarray]:
    """`demo_subject_slices`, and the same slices without their added noise (same scaling):
    how well a perfect denoiser could reconstruct them."""
    heights = torch.nonzero((template[0] > 0).any(0).any(0))[:, 0]  # axial planes that hold brain
    grid = demo_sampling_grid(
        template.shape[1:], (heights.min().item(), heights.max().item()), rng, n_slices
    )
    t1, gm, wm = F.grid_sample(template[None], grid, align_corners=True)[0]  # each (K, H, W)
    brain = t1 > 0.02  # the template is skull-stripped: zero outside the brain, above 0.25 inside

    contrast = 1 + rng.uniform(-0.08, 0.08) * gm + rng.uniform(-0.04, 0.08) * wm
    image = (t1 * contrast).clamp(min=0) ** rng.uniform(0.8, 1.25) * demo_bias_field(rng, n_slices)
    noise = torch.from_numpy(rng.standard_normal(image.shape, dtype=np.float32))
    clean = image.clamp(min=0) * brain
    image = (image + rng.uniform(0.01, 0.03) * noise).clamp(min=0) * brain

    # Every 7th brain pixel: torch.quantile refuses inputs above 16M values.
    bright = torch.quantile(image[brain][::7], 0.99)
    scale = rng.uniform(225, 250) / bright
    return tuple((t * scale).round().clamp(0, 255).to(torch.uint8).numpy() for t in (image, clean))


def demo_sampling_grid(
    shape: tuple[int, int, int], brain_z: tuple[int, int], rng: np.random.Generator, n_slices: int
) -> torch.Tensor:
    """grid_sample grid (1, K, 256, 256, 3) of K output slices in a randomly deformed template.

    `shape` is the template's (X, Y, Z); the slices are evenly spaced over `DEMO_SLICE_RANGE`
    of the brain's axial extent `brain_z` (first and last voxel).
    """
    centre = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    low, high = DEMO_SLICE_RANGE
    heights = (
        brain_z[0] + torch.linspace(low, high, n_slices) * (brain_z[1] - brain_z[0]) - centre[2]
    )
    points = frame_points(heights, IMAGE_SIZE)  # (K, H, W, 3)

    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    rotation = rotation_matrix(*np.deg2rad(rng.uniform(-1, 1, size=3) * [4, 3, 6]))
    affine = torch.from_numpy((rotation / scale).astype(np.float32))  # subject mm -> template mm
    shift = torch.from_numpy((rng.uniform(-1, 1, size=3) * [4, 4, 3]).astype(np.float32))  # mm
    template_mm = points @ affine.T + shift + elastic_displacement(rng, heights)

    normalised = (template_mm + centre) / centre - 1  # align_corners: ±1 are the end voxels
    return normalised.flip(-1)[None]  # grid_sample wants (z, y, x) order for an (X, Y, Z) volume


def frame_points(heights: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size, size, 3) RAS positions in mm of the pixels of axial slices at `heights` (mm).

    The frame spans 256 mm, so pixels are 1 mm apart when `size` is 256.

    Radiological view: row 0 is anterior, column 0 is the subject's right.
    """
    half_extent = (IMAGE_SIZE - 1) / 2
    axis = torch.linspace(half_extent, -half_extent, size)
    z, y, x = torch.meshgrid(heights, axis, axis, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def elastic_displacement(rng: np.random.Generator, heights: torch.Tensor) -> torch.Tensor:
    """Smooth random displacement (K, 256, 256, 3) in mm: a coarse random field, interpolated."""
    control = torch.from_numpy(rng.normal(0, 2.5, size=(3, 5, 5, 5)).astype(np.float32))
    # The field is smooth over its 64 mm control spacing: computing it every 4 mm is enough.
    coarse = sample_field(control, frame_points(heights, 65))  # (K, 65, 65, 3)
    fine = F.interpolate(
        coarse.permute(0, 3, 1, 2),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        mode="bilinear",
        align_corners=True,
    )
    return fine.permute(0, 2, 3, 1)


def demo_bias_field(rng: np.random.Generator, n_slices: int) -> torch.Tensor:
    """Smooth multiplicative intensity field (K, 256, 256) around 1, like an MRI coil's bias."""
    coarse = torch.from_numpy(rng.normal(0, 0.08, size=(1, 3, 3, 3)).astype(np.float32))
    field = F.interpolate(
        coarse[None], size=(n_slices, IMAGE_SIZE, IMAGE_SIZE), mode="trilinear", align_corners=True
    )
    return field[0, 0].exp()


def sample_field(control: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample a (C, Dz, Hy, Wx) field spanning ±128 mm at `points` (..., 3) in mm -> (..., C)."""
    grid = (points / (IMAGE_SIZE / 2)).reshape(1, 1, 1, -1, 3)
    values = F.grid_sample(control[None], grid, align_corners=True, padding_mode="border")
    return values.reshape(control.shape[0], -1).T.reshape(*points.shape[:-1], control.shape[0])


def rotation_matrix(about_x: float, about_y: float, about_z: float) -> np.ndarray:
    """3x3 rotation by the given angles in radians, applied about x, then y, then z."""
    angles = [about_x, about_y, about_z]
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Summarise a data root; without one, build and summarise the demo set."
    )
    parser.add_argument(
        "root", nargs="?", type=Path, help="data root (default: the demo set, built if needed)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild the demo set even if it is complete"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        splits = load_splits(args.root or build_demo_dataset(force=args.force))
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    for split, slices in splits.items():
        cases = {case_id(name) for name in slices.names}
        print(
            f"{split:>8}: {len(slices)} slices from {len(cases)} cases, "
            f"tensor {tuple(slices.images.shape)}"
        )
    print(compute_normalisation(splits["train"].images))


if __name__ == "__main__":
    main()
