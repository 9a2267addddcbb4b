"""Build the offline demo set: pseudo-subjects made from the MNI ICBM152 2009a template that
ships inside nilearn (random deformation, contrast, bias field and noise), saved as an OASIS-layout
root; and, for the noise ceiling, the demo test slices with and without their noise.
Its command line is tools/demo_data.py."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from brainvq.data.slices import IMAGE_SIZE, DatasetError
from dataset import OASIS_SPLIT_DIRS

log = logging.getLogger(__name__)

DEMO_TRAIN_SUBJECTS = 40
DEMO_VALIDATE_SUBJECTS = 5
DEMO_TEST_SUBJECTS = 5
DEMO_SLICES_PER_SUBJECT = 32
# `--oasis-size`: subjects per split that give, at 32 slices each, the course's OASIS split sizes
# (9,664 / 1,120 / 544 slices), to time a full-size run without OASIS.
OASIS_SIZED_SUBJECTS = {"train": 302, "validate": 35, "test": 17}
DEMO_SLICE_RANGE = (0.3, 0.85)  # part of the brain's axial extent sliced, bottom to top
DEMO_VERSION = 1  # bump when the generator changes, so old demo sets are rebuilt
DEMO_MARKER = ".complete"
DEMO_STAGING = ".building"
SUBJECTS_PER_PROCESS = 8  # the build takes one process per core, each with this many or more
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


# ---------------------------------------------------------------- demo data


def demo_root() -> Path:
    """Default location of the demo set: ``data/demo_oasis`` beside this file."""
    return Path(__file__).resolve().parents[2] / "data" / "demo_oasis"


def template_dir() -> Path:
    """Folder that holds the MNI152 2009a template: $DEMO_TEMPLATES where set (a machine without
    nilearn, e.g. the three files copied beside the project), else inside the nilearn package."""
    if os.environ.get("DEMO_TEMPLATES"):
        return Path(os.environ["DEMO_TEMPLATES"])
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
                "ships inside nilearn: pip install nilearn (or set DEMO_TEMPLATES to a folder "
                "holding its three files)."
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
    extra_train: int = 0,
) -> Path:
    """Build the demo set at `root` (default `demo_root()`) in the OASIS layout, once.

    A complete earlier build with the same settings is reused; other settings rebuild it.

    Each pseudo-subject is the MNI152 template under a random smooth deformation
    (affine plus elastic) and intensity change (GM/WM contrast, gamma, bias field,
    noise inside the brain), sliced axially like OASIS. Cases are numbered from 1
    across train, validate and test in that order, so no subject is in two splits;
    subject ``c`` depends only on (`seed`, ``c``, `slices_per_subject`). `extra_train` more
    training subjects are numbered after the test ones, so the held-out splits stay exactly
    those of a build without them: more distinct training slices, the same test.
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
    if extra_train:  # only then: a default build's marker stays as it was
        settings["extra_train"] = extra_train
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
    subjects = []  # (folder, case) in case order
    for split, n_subjects in counts.items():
        folder = staging / OASIS_SPLIT_DIRS[split][0]
        folder.mkdir(parents=True)
        subjects += [(folder, len(subjects) + 1 + k) for k in range(n_subjects)]
    first_extra = len(subjects) + 1
    subjects += [(staging / OASIS_SPLIT_DIRS["train"][0], first_extra + k)
                 for k in range(extra_train)]
    workers = max(1, min(os.cpu_count() or 1, len(subjects) // SUBJECTS_PER_PROCESS))
    # Each subject depends only on its own case number: the shares can be built in any order.
    write_in_processes([subjects[w::workers] for w in range(workers)], seed, slices_per_subject)

    # Swap the new folders in; until the marker is rewritten, the staging folder marks root as ours.
    (root / DEMO_MARKER).unlink(missing_ok=True)
    for (name,) in OASIS_SPLIT_DIRS.values():
        shutil.rmtree(root / name, ignore_errors=True)
        (staging / name).rename(root / name)
    (root / DEMO_MARKER).write_text(json.dumps(settings))
    staging.rmdir()
    log.info("Built the demo set in %.1f s", time.perf_counter() - start)
    return root


def write_in_processes(shares: list[list[tuple[Path, int]]], seed: int,
                       slices_per_subject: int) -> None:
    """`write_subjects` for the first share here, and for each other one in a new process."""
    if len(shares) == 1:
        return write_subjects(shares[0], seed, slices_per_subject)
    spawn = multiprocessing.get_context("spawn")  # fork is unsafe once torch's threads run
    with ProcessPoolExecutor(len(shares) - 1, mp_context=spawn) as pool:
        others = [pool.submit(write_subjects, share, seed, slices_per_subject)
                  for share in shares[1:]]
        write_subjects(shares[0], seed, slices_per_subject)
        for done in others:
            done.result()


def write_subjects(subjects: list[tuple[Path, int]], seed: int, slices_per_subject: int) -> None:
    """Save the slices of each (folder, case) pseudo-subject as OASIS-named PNGs."""
    template = load_template()
    with single_torch_thread():
        for folder, case in subjects:
            rng = np.random.default_rng([seed, case])
            for k, image in enumerate(demo_subject_slices(template, rng, slices_per_subject)):
                path = folder / f"case_{case:03d}_slice_{k}.nii.png"
                Image.fromarray(image).save(path, compress_level=1)


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


def demo_test_pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The default demo set's test slices, uint8 (N, 256, 256), and their noise-free versions."""
    first = DEMO_TRAIN_SUBJECTS + DEMO_VALIDATE_SUBJECTS + 1
    template = load_template()
    noisy, clean = [], []
    with single_torch_thread():
        for case in range(first, first + DEMO_TEST_SUBJECTS):
            rng = np.random.default_rng([seed, case])
            pair = demo_subject_with_clean(template, rng, DEMO_SLICES_PER_SUBJECT)
            noisy.append(pair[0])
            clean.append(pair[1])
    return np.concatenate(noisy), np.concatenate(clean)


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
