"""Volume roots: NIfTI and Analyze files sliced axially and split by subject."""

import re
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from brainvq.data.slices import IMAGE_SIZE, SPLITS, DatasetError, case_id, slice_index
from brainvq.data.volumes import MIN_SLICE_AREA, VOLUME_SPACING_MM, split_subjects
from dataset import find_split_dirs, load_split, load_splits

SHAPE = (40, 48, 30)  # (X, Y, Z) in RAS order
BRAIN_MM = (80.0, 100.0, 60.0)  # diameters of `ellipsoid`'s brain: left-right, front-back, up-down


def brain(seed=0, shape=SHAPE):
    """int16 RAS volume: an ellipsoid "brain" of random tissue on a background of exact 0."""
    rng = np.random.default_rng(seed)
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-2, 2, 3)
    radii = np.array(shape) * [0.4, 0.4, 0.35]
    offsets = (np.indices(shape) - centre[:, None, None, None]) / radii[:, None, None, None]
    inside = (offsets**2).sum(0) <= 1
    return (inside * rng.integers(200, 1000, shape)).astype(np.int16)


def ellipsoid(size_mm, voxel_mm, margin_mm=6.0):
    """int16 RAS volume of `voxel_mm` voxels: a uniform ellipsoid "brain" with diameters
    `size_mm`, centred in a field of view `margin_mm` wider on each side, on exact 0."""
    shape = np.ceil((np.add(size_mm, 2 * margin_mm)) / voxel_mm).astype(int)
    squares = [
        ((np.arange(n) - (n - 1) / 2) * mm / (size / 2)) ** 2
        for n, mm, size in zip(shape, voxel_mm, size_mm, strict=True)
    ]
    inside = squares[0][:, None, None] + squares[1][None, :, None] + squares[2] <= 1
    return (inside * 800).astype(np.int16)


def brain_extent(slices):
    """Columns (left-right) and rows (front-back) of the largest slice's brain, and the
    number of slices; brain pixels are those above half the brain's 255."""
    inside = slices.images.numpy() > 127  # edges blurred by interpolation: half-way counts
    largest = inside[inside.sum((1, 2)).argmax()]
    return largest.any(0).sum(), largest.any(1).sum(), len(inside)


def stored_as(volume, codes, shift=(0.0, 0.0, 0.0), voxel_mm=(1.0, 1.0, 1.0)):
    """`volume` (RAS) of `voxel_mm` voxels laid out on disk with axes `codes` (e.g. "LPS"),
    and the affine saying so."""
    affine = np.diag([*voxel_mm, 1.0])
    affine[:3, 3] = shift
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    stored = apply_orientation(volume, transform)
    stored_affine = affine @ inv_ornt_aff(transform, volume.shape)
    assert nib.aff2axcodes(stored_affine) == tuple(codes)
    return np.ascontiguousarray(stored), stored_affine


def save(path, data, affine=None):
    """Save as NIfTI (.nii, .nii.gz) or Analyze (.hdr/.img, whose header keeps no orientation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_class = nib.AnalyzeImage if path.suffix == ".hdr" else nib.Nifti1Image
    nib.save(image_class(data, np.eye(4) if affine is None else affine), path)
    return path


def as_analyze(volume):
    """What to store in an Analyze file so that it reads back as `volume`: nibabel takes
    Analyze data as radiological (LAS)."""
    return np.ascontiguousarray(volume[::-1])


def load_volume_slices(folder, volume, codes="RAS", suffix=".nii"):
    """Slices of one volume through a split folder that holds only it."""
    data, affine = stored_as(volume, codes, shift=(10.0, -20.0, 5.0))
    save(folder / codes / f"vol{suffix}", data, affine)
    return load_split(folder / codes)


def make_volume_root(root, n=10):
    """`n` one-volume subjects in nested folders, mixing .nii, .nii.gz and Analyze, stored with
    random orientations and shifts, plus files the loader must ignore."""
    rng = np.random.default_rng(1)
    for i in range(n):
        volume = brain(seed=i)
        folder = root / f"group{i % 3}" / f"subject{i:02d}"
        if i % 3 == 2:
            save(folder / f"vol{i:02d}.hdr", as_analyze(volume))
        else:
            codes = "".join(rng.choice(list(pair)) for pair in ("RL", "AP", "SI"))
            data, affine = stored_as(volume, codes, rng.uniform(-50, 50, 3))
            save(folder / f"vol{i:02d}{'.nii' if i % 3 else '.nii.gz'}", data, affine)
    (root / "group0" / "notes.txt").write_text("not a volume")
    (root / "group0" / "._vol00.nii").write_bytes(b"macOS resource fork")  # hidden: skipped
    return root


@pytest.fixture(scope="module")
def volume_root(tmp_path_factory):
    return make_volume_root(tmp_path_factory.mktemp("volumes"))


@pytest.fixture(scope="module")
def volume_splits(volume_root):
    return load_splits(volume_root)


# ---------------------------------------------------------------- discovery and splits


def test_volumes_are_found_recursively_and_split_by_volume(volume_splits):
    volumes = {split: {case_id(name) for name in s.names} for split, s in volume_splits.items()}
    assert list(volume_splits) == list(SPLITS)
    assert [len(v) for v in volumes.values()] == [8, 1, 1]  # 80/10/10 of 10 volumes
    assert set().union(*volumes.values()) == {f"vol{i:02d}" for i in range(10)}
    assert sum(len(v) for v in volumes.values()) == 10  # no volume in two splits


def test_volume_slices_are_uint8_frames_with_zero_background(volume_splits):
    for slices in volume_splits.values():
        images = slices.images
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
        assert len(images) == len(slices.names)
        outside = torch.ones(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        top, left = (IMAGE_SIZE - SHAPE[1]) // 2, (IMAGE_SIZE - SHAPE[0]) // 2  # rows are y
        outside[top : top + SHAPE[1], left : left + SHAPE[0]] = False
        assert images[:, outside].max() == 0  # padding is exactly 0, no resampling
        assert (images > 0).float().mean((1, 2)).min() > 0
    assert volume_splits["train"].images.max() == 255


def test_volume_loading_is_deterministic(volume_root, volume_splits):
    again = load_splits(volume_root)
    for split in SPLITS:
        assert again[split].names == volume_splits[split].names
        assert torch.equal(again[split].images, volume_splits[split].images)


def test_only_requested_splits_are_loaded(volume_root, volume_splits):
    test = load_splits(volume_root, splits=("test",))
    assert list(test) == ["test"]
    assert test["test"].names == volume_splits["test"].names
    with pytest.raises(ValueError, match="Unknown splits"):
        load_splits(volume_root, splits=("training",))


@pytest.mark.parametrize("n", [3, 4, 10, 25, 416])
def test_split_fractions(n):
    subjects = [f"s{i}" for i in range(n)]
    splits = split_subjects(subjects)
    sizes = [len(splits[split]) for split in SPLITS]
    assert min(sizes) >= 1 and sum(sizes) == n
    assert sorted(sum(splits.values(), []), key=lambda s: int(s[1:])) == subjects
    assert sizes[1] == sizes[2] == max(1, round(0.1 * n))
    assert split_subjects(subjects[::-1]) == splits  # depends on the set, not the order found


def test_sessions_of_one_subject_stay_together_and_oasis_uses_masked_volumes(tmp_path):
    # OASIS-1 raw release: each session holds raw scans, processed stages and a segmentation.
    # Subject 0002 was scanned twice (MR1, MR2).
    sessions = ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0002_MR2", "OAS1_0003_MR1", "OAS1_0004_MR1"]
    for i, session in enumerate(sessions):
        volume = as_analyze(brain(seed=i, shape=(20, 24, 16)))[..., None]  # OASIS files are 4-D
        stem = f"{session}_mpr_n4_anon_111_t88"
        save(tmp_path / session / "RAW" / f"{session}_mpr-1_anon.hdr", volume)
        save(tmp_path / session / "PROCESSED/MPRAGE/T88_111" / f"{stem}_gfc.hdr", volume)
        save(tmp_path / session / "PROCESSED/MPRAGE/T88_111" / f"{stem}_masked_gfc.hdr", volume)
        save(tmp_path / session / "FSL_SEG" / f"{stem}_masked_gfc_fseg.hdr", volume)

    splits = load_splits(tmp_path)
    volumes = {split: {case_id(name) for name in s.names} for split, s in splits.items()}
    assert set().union(*volumes.values()) == {
        f"{session}_mpr_n4_anon_111_t88_masked_gfc" for session in sessions
    }
    subjects = [{name[:9] for name in v} for v in volumes.values()]
    assert [len(s) for s in subjects] == [2, 1, 1]  # 4 subjects, no subject in two splits
    assert sum(len(s) for s in subjects) == 4


def test_split_folders_may_hold_volumes(tmp_path):
    for i, split in enumerate(("train", "val", "test")):
        save(tmp_path / split / "nested" / f"scan{i}.nii.gz", brain(seed=i))
    splits = load_splits(tmp_path)
    assert {split: {case_id(n) for n in s.names} for split, s in splits.items()} == {
        "train": {"scan0"},
        "validate": {"scan1"},
        "test": {"scan2"},
    }


def test_repeated_file_names_are_told_apart_by_folder(tmp_path):
    for i in range(3):
        save(tmp_path / f"subj{i}" / "anat" / "T1w.nii.gz", brain(seed=i))
    names = [n for s in load_splits(tmp_path).values() for n in s.names]
    assert {case_id(n) for n in names} == {f"subj{i}_anat_T1w" for i in range(3)}


# ---------------------------------------------------------------- slicing


def test_slices_cover_the_brain_extent_bottom_up(tmp_path):
    volume = brain(seed=3)
    area = (volume > 0).sum((0, 1))
    kept = np.flatnonzero(area >= MIN_SLICE_AREA * area.max())
    top = np.flatnonzero(area)[-1]
    assert top > kept[-1]  # the ellipsoid's top slice holds a few voxels: it is dropped
    x, y = SHAPE[0] // 2, SHAPE[1] // 2
    volume[x : x + 3, y : y + 3, top + 1] = 500  # so is a near-empty slice above it
    volume[0:2, 0:2, 1] = 900  # and a speck far below the brain

    slices = load_volume_slices(tmp_path, volume)
    assert [slice_index(name) for name in slices.names] == list(range(kept[0], kept[-1] + 1))
    assert slices.names[0] == f"vol_slice_{kept[0]}.png"


def test_intensities_scale_to_8_bit_per_volume(tmp_path):
    volume = brain(seed=4).astype(np.float32) * 0.01  # the scale of the stored values is irrelevant
    slices = load_volume_slices(tmp_path, volume).images
    assert slices.max() == 255
    assert (slices == 255).float().sum() / (slices > 0).float().sum() < 0.01  # 99.5th pct -> 255
    assert slices.min() == 0


@pytest.mark.parametrize("codes", ["LAS", "RPS", "RAI", "LPI", "ASR", "SLP"])
def test_axis_flips_and_permutations_are_undone(tmp_path, codes):
    volume = brain(seed=5)
    reference = load_volume_slices(tmp_path, volume)
    reoriented = load_volume_slices(tmp_path, volume, codes=codes, suffix=".nii.gz")
    assert reoriented.names == reference.names
    assert torch.equal(reoriented.images, reference.images)


def test_analyze_files_read_as_radiological(tmp_path):
    volume = brain(seed=6)
    reference = load_volume_slices(tmp_path, volume)
    save(tmp_path / "analyze" / "vol.hdr", as_analyze(volume))
    assert torch.equal(load_split(tmp_path / "analyze").images, reference.images)


def test_anterior_is_at_the_top_and_the_right_on_the_left(tmp_path):
    """The view of the PNG slices (and of `build_demo_dataset`): radiological, anterior up."""
    volume = brain(seed=7)
    x, y, _ = SHAPE
    volume[x // 2 + 4 : x // 2 + 8, y // 2 + 6 : y // 2 + 10] *= 20  # right anterior quadrant
    image = load_volume_slices(tmp_path, volume, codes="LPI").images[SHAPE[2] // 3]
    row, column = np.unravel_index(np.argmax(image.numpy()), image.shape)
    assert row < IMAGE_SIZE // 2 and column < IMAGE_SIZE // 2


def test_4d_volume_with_a_trailing_singleton_works(tmp_path):
    volume = brain(seed=8)
    reference = load_volume_slices(tmp_path, volume)
    save(tmp_path / "nifti4d" / "vol.nii", volume[..., None])
    save(tmp_path / "analyze4d" / "vol.hdr", as_analyze(volume)[..., None])
    assert torch.equal(load_split(tmp_path / "nifti4d").images, reference.images)
    assert torch.equal(load_split(tmp_path / "analyze4d").images, reference.images)


# ---------------------------------------------------------------- voxel size


def save_ellipsoid(folder, voxel_mm, codes="RAS", size_mm=BRAIN_MM):
    """A split folder holding one `ellipsoid` stored with `voxel_mm` voxels and axes `codes`."""
    data, affine = stored_as(ellipsoid(size_mm, voxel_mm), codes, voxel_mm=voxel_mm)
    save(folder / "vol.nii", data, affine)
    return folder


@pytest.mark.parametrize(
    "voxel_mm, codes",
    [((0.5, 0.5, 0.5), "RAS"), ((1, 1, 1), "LPI"), ((2, 2, 2), "LAS"), ((0.9, 0.9, 1.2), "ASR")],
)
def test_slices_show_the_brain_at_1_mm_per_pixel_whatever_the_voxel_size(tmp_path, voxel_mm, codes):
    assert VOLUME_SPACING_MM == 1.0
    columns, rows, n_slices = brain_extent(load_split(save_ellipsoid(tmp_path, voxel_mm, codes)))
    assert columns == pytest.approx(BRAIN_MM[0], abs=2)
    assert rows == pytest.approx(BRAIN_MM[1], abs=2)
    # End slices with under MIN_SLICE_AREA of the largest brain area are dropped, and the
    # level that finds the brain lies up to 0.9 voxel beyond a linearly blurred edge.
    assert -2 <= n_slices - BRAIN_MM[2] * np.sqrt(1 - MIN_SLICE_AREA) <= 2 + 2 * voxel_mm[2]


def test_spacing_0_keeps_the_files_grid(tmp_path):
    folder = save_ellipsoid(tmp_path, (0.5, 0.5, 0.5))
    columns, rows, n_slices = brain_extent(load_split(folder, spacing=0))
    assert (columns, rows) == pytest.approx((2 * BRAIN_MM[0], 2 * BRAIN_MM[1]), abs=2)
    assert n_slices == pytest.approx(2 * BRAIN_MM[2] * np.sqrt(1 - MIN_SLICE_AREA), abs=2)
    with pytest.raises(ValueError, match="spacing"):
        load_split(folder, spacing=-1)


def test_1_mm_volumes_are_not_resampled(tmp_path):
    volume = brain(seed=10)
    save(tmp_path / "analyze" / "vol.hdr", as_analyze(volume)[..., None])  # like OASIS-1's
    data, affine = stored_as(volume, "LPI", voxel_mm=(1.0004, 0.9996, 1.0))  # float rounding
    save(tmp_path / "nifti" / "vol.nii", data, affine)
    for folder in ("analyze", "nifti"):
        default, kept = load_split(tmp_path / folder), load_split(tmp_path / folder, spacing=0)
        assert default.names == kept.names
        assert torch.equal(default.images, kept.images)


def test_spacing_reaches_volume_roots_and_split_folders(tmp_path, volume_root, volume_splits):
    coarse = load_splits(volume_root, splits=("test",), spacing=2.0)["test"]
    assert len(coarse) == pytest.approx(len(volume_splits["test"]) / 2, abs=1)
    for i, split in enumerate(("train", "val", "test")):
        save(tmp_path / split / f"scan{i}.nii", brain(seed=i))
    fine, coarse = load_splits(tmp_path), load_splits(tmp_path, spacing=2.0)
    for split in SPLITS:
        assert len(coarse[split]) == pytest.approx(len(fine[split]) / 2, abs=1)


def test_a_brain_wider_than_the_frame_warns_once_with_the_cut_and_the_fix(tmp_path):
    folder = save_ellipsoid(tmp_path, (2, 2, 2), size_mm=(280.0, 100.0, 20.0))
    with pytest.warns(UserWarning, match="cut off") as caught:
        images = load_split(folder).images
    (message,) = [str(w.message) for w in caught if "cut off" in str(w.message)]
    assert "vol.nii" in message and "anterior-posterior" not in message
    cut = float(re.search(r"so (\S+) mm left-right", message)[1])
    assert cut == pytest.approx(280 - IMAGE_SIZE, abs=3)
    assert (images[:, :, [0, -1]] > 0).any()  # the brain reaches the frame's sides
    spacing = float(re.search(r"--spacing (\S+) ", message)[1])
    assert spacing * IMAGE_SIZE >= 280
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        columns, rows, _ = brain_extent(load_split(folder, spacing=spacing))
    assert columns == pytest.approx(280 / spacing, abs=2)
    assert rows == pytest.approx(100 / spacing, abs=2)


# ---------------------------------------------------------------- errors


def test_4d_series_is_refused(tmp_path):
    save(tmp_path / "s1" / "bold.nii.gz", np.stack([brain(seed=9)] * 3, axis=-1))
    for i in range(3):
        save(tmp_path / f"t{i}.nii", brain(seed=i))
    with pytest.raises(DatasetError, match=r"bold\.nii\.gz has shape \(40, 48, 30, 3\).*4-D"):
        load_splits(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "missing .img", "missing .hdr", "not a volume"])
def test_corrupt_volume_is_named(tmp_path, damage):
    for i in range(3):
        save(tmp_path / f"ok{i}.nii", brain(seed=i))
    if damage == "truncated":
        bad = save(tmp_path / "sub" / "bad.nii.gz", brain(seed=9))
        bad.write_bytes(bad.read_bytes()[:500])
    elif damage == "missing .img":
        bad = save(tmp_path / "sub" / "bad.hdr", as_analyze(brain(seed=9)))
        bad.with_suffix(".img").unlink()
    elif damage == "missing .hdr":
        save(tmp_path / "sub" / "bad.hdr", as_analyze(brain(seed=9))).unlink()
    else:
        bad = tmp_path / "sub" / "bad.nii"
        bad.parent.mkdir()
        bad.write_bytes(b"\0" * 400)
    # The split is by subject, so the bad file may fall in any split: load all of them.
    with pytest.raises(DatasetError, match=r"Cannot read volume .*bad\..*Replace it"):
        load_splits(tmp_path)


def test_train_reports_a_bad_volume_in_one_line(tmp_path, capsys):
    import train

    for i in range(3):
        save(tmp_path / f"ok{i}.nii", brain(seed=i))
    bad = save(tmp_path / "bad.nii", brain(seed=9))
    bad.write_bytes(bad.read_bytes()[:1000])  # nibabel's message for this spans two lines
    code = train.main(
        ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--profile", "tiny"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.nii" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_volume_is_named(tmp_path):
    save(tmp_path / "a" / "empty.nii", np.zeros(SHAPE, np.int16))
    with pytest.raises(DatasetError, match=r"empty\.nii has no voxel above 0"):
        load_split(tmp_path / "a")


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_volumes_is_refused(tmp_path, n):
    for i in range(n):
        save(tmp_path / f"v{i}.nii", brain(seed=i))
    with pytest.raises(DatasetError, match=f"holds {n} volume.*at least 3"):
        load_splits(tmp_path)


def test_fewer_than_three_subjects_is_refused(tmp_path):
    for subject, session in [("01", "1"), ("01", "2"), ("02", "1")]:
        path = tmp_path / f"sub-{subject}" / f"ses-{session}" / f"sub-{subject}_T1w.nii.gz"
        save(path, brain(seed=int(subject + session)))
    with pytest.raises(DatasetError, match="3 volume.*of 2 subject"):
        load_splits(tmp_path)


def test_find_split_dirs_points_volume_roots_to_load_splits(volume_root):
    with pytest.raises(DatasetError, match="holds 3-D volumes.*load_splits"):
        find_split_dirs(volume_root)


def test_root_without_images_or_volumes_still_explains_the_layouts(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match=r"does not hold the split folders.*\.hdr/\.img"):
        load_splits(tmp_path)
