"""Load 3-D brain MRI volumes (NIfTI, Analyze) as axial slices: find and name them, split
them by subject, read them with nibabel, resample them to `VOLUME_SPACING_MM`, and slice them,
warning when the frame cuts off brain.

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
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainvq.data.slices import (
    IMAGE_SIZE,
    SPLITS,
    DatasetError,
    SliceSet,
    centre_fit,
    centred_span,
    natural_key,
)

log = logging.getLogger(__name__)

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
    start, _, count = centred_span(len(brain), IMAGE_SIZE)
    where = np.flatnonzero(brain)
    span = int(where[-1] - where[0] + 1) if len(where) else 0
    return span, int(brain.sum() - brain[start : start + count].sum())
