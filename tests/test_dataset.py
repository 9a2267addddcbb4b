import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.data.slices import (
    IMAGE_SIZE,
    DatasetError,
    case_id,
    centre_fit,
    evenly_spaced,
    relative_positions,
    slice_index,
)
from dataset import (
    Normalisation,
    compute_normalisation,
    find_split_dirs,
    load_split,
    load_splits,
)

OASIS_DIRS = ("keras_png_slices_train", "keras_png_slices_validate", "keras_png_slices_test")


def write_image(path, value=0, size=(IMAGE_SIZE, IMAGE_SIZE), mode="L"):
    """Save a constant image of `value`; `size` is (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).convert(mode).save(path)
    return path


def make_oasis_root(root, names_per_split=None):
    """A tiny OASIS-layout root whose images hold their position in natural order as pixel value."""
    names = names_per_split or ["case_001_slice_0.nii.png"]
    for folder in OASIS_DIRS:
        for value, name in enumerate(names):
            write_image(root / folder / name, value)
        write_image(root / folder.replace("slices_", "slices_seg_") / names[0], 255)
    return root


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "case", "index"),
    [
        ("case_001_slice_0.nii.png", "001", 0),
        ("case_441_slice_31.nii.png", "441", 31),
        ("some/folder/case_010_slice_2.nii.png", "010", 2),
        ("case_001_slice_x.nii.png", None, None),
        ("notes.txt", None, None),
        ("seg_001_slice_0.nii.png", None, None),
        (
            "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_slice_87.png",
            "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc",
            87,
        ),
        ("sub-01_T1w_slice_3_slice_12.png", "sub-01_T1w_slice_3", 12),
        ("case_002_slice_5.png", "002", 5),
    ],
)
def test_name_parsing(name, case, index):
    assert case_id(name) == case
    assert slice_index(name) == index


# ---------------------------------------------------------------- layouts


def test_oasis_layout_is_natural_sorted_and_skips_seg_and_non_images(tmp_path):
    natural = [
        "case_002_slice_2.nii.png",
        "case_002_slice_10.nii.png",
        "case_010_slice_0.nii.png",
        "case_010_slice_1.nii.png",
    ]
    root = make_oasis_root(tmp_path, natural)
    (root / OASIS_DIRS[0] / ".DS_Store").write_bytes(b"\0\1junk")
    (root / OASIS_DIRS[0] / "notes.txt").write_text("not an image")

    assert find_split_dirs(root) == {
        "train": root / OASIS_DIRS[0],
        "validate": root / OASIS_DIRS[1],
        "test": root / OASIS_DIRS[2],
    }
    splits = load_splits(root)
    assert set(splits) == {"train", "validate", "test"}
    train = splits["train"]
    assert len(train) == 4
    assert train.names == natural
    assert train.images.dtype == torch.uint8
    assert train.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE)
    assert train.images[:, 0, 0].tolist() == [
        0,
        1,
        2,
        3,
    ]  # each image was written with its sorted position


def test_plain_layout_with_val_folder_and_jpeg(tmp_path):
    write_image(tmp_path / "train" / "a.png", 10)
    write_image(tmp_path / "val" / "b.jpg", 128)
    write_image(tmp_path / "test" / "c.jpeg", 200)

    dirs = find_split_dirs(tmp_path)
    assert dirs["validate"] == tmp_path / "val"
    splits = load_splits(tmp_path)
    assert [len(s) for s in splits.values()] == [1, 1, 1]
    assert abs(int(splits["validate"].images[0, 128, 128]) - 128) <= 2  # JPEG is lossy


def test_layout_one_folder_down_is_found(tmp_path):
    make_oasis_root(tmp_path / "keras_png_slices_data")
    assert find_split_dirs(tmp_path)["test"] == tmp_path / "keras_png_slices_data" / OASIS_DIRS[2]


# ---------------------------------------------------------------- errors


def test_nonexistent_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        find_split_dirs(missing)


def test_missing_split_folders_lists_found_and_expected(tmp_path):
    write_image(tmp_path / OASIS_DIRS[0] / "case_001_slice_0.nii.png")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError) as error:
        find_split_dirs(tmp_path)
    message = str(error.value)
    assert "Missing: keras_png_slices_validate/, keras_png_slices_test/" in message
    assert "Found: keras_png_slices_train/, stuff/" in message
    assert "train/, validate/ (or val/), test/" in message


def test_empty_split_is_an_error(tmp_path):
    root = make_oasis_root(tmp_path)
    for path in (root / OASIS_DIRS[1]).iterdir():
        path.unlink()
    (root / OASIS_DIRS[1] / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="keras_png_slices_validate holds no"):
        load_splits(root)


def test_corrupt_image_is_named(tmp_path):
    root = make_oasis_root(tmp_path)
    (root / OASIS_DIRS[2] / "case_009_slice_0.nii.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="case_009_slice_0.nii.png"):
        load_splits(root)


def test_truncated_png_is_named(tmp_path):
    root = make_oasis_root(tmp_path)
    path = root / OASIS_DIRS[0] / "case_001_slice_0.nii.png"
    noisy = np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    Image.fromarray(noisy).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="case_001_slice_0.nii.png"):
        load_splits(root)


# ---------------------------------------------------------------- conversion and size


def test_rgb_and_16_bit_images_become_8_bit_grayscale(tmp_path):
    folder = tmp_path / "split"
    write_image(folder / "a_rgb.png", 100, mode="RGB")
    write_image(folder / "b_rgba.png", 50, mode="RGBA")
    wide = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint16)
    wide[0, 0], wide[0, 1] = 4000, 2000
    Image.fromarray(wide).save(folder / "c_16bit.png")

    with pytest.warns(UserWarning, match="converted images to 8-bit grayscale") as caught:
        slices = load_split(folder)
    assert len(caught) == 1  # one warning for the split, not one per file
    assert slices.images.dtype == torch.uint8
    assert slices.images[0].unique().tolist() == [100]
    assert slices.images[1].unique().tolist() == [50]
    assert slices.images[2, 0, :3].tolist() == [255, 128, 0]  # rescaled so the maximum becomes 255


@pytest.mark.parametrize(("height", "width"), [(200, 300), (255, 257), (256, 100)])
def test_other_sizes_are_centre_padded_or_cropped(tmp_path, height, width):
    image = np.arange(height * width, dtype=np.int64).reshape(height, width) % 251 + 1  # no zeros
    fitted = centre_fit(image)
    assert fitted.shape == (IMAGE_SIZE, IMAGE_SIZE)
    rows, cols = min(height, IMAGE_SIZE), min(width, IMAGE_SIZE)
    top, left = (IMAGE_SIZE - rows) // 2, (IMAGE_SIZE - cols) // 2
    src_top, src_left = (height - rows) // 2, (width - cols) // 2
    assert (fitted != 0).sum() == rows * cols  # padding is exactly 0
    np.testing.assert_array_equal(
        fitted[top : top + rows, left : left + cols],
        image[src_top : src_top + rows, src_left : src_left + cols],
    )

    write_image(tmp_path / "split" / "odd.png", 7, size=(height, width))
    with pytest.warns(UserWarning, match="centre-cropped/zero-padded"):
        slices = load_split(tmp_path / "split")
    assert slices.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert int((slices.images == 7).sum()) == rows * cols


# ---------------------------------------------------------------- normalisation


def test_normalisation_statistics_and_round_trip():
    images = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    norm = compute_normalisation(images)
    scaled = images.double() / 255
    assert norm.mean == pytest.approx(scaled.mean().item(), abs=1e-9)
    assert norm.std == pytest.approx(scaled.std(unbiased=False).item(), abs=1e-9)

    normalised = norm.normalise(images)
    assert normalised.dtype == torch.float32
    assert normalised.shape == (3, 1, 16, 16)
    assert normalised.mean().item() == pytest.approx(0, abs=1e-5)
    assert normalised.std(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(norm.normalise(images[:, None]), normalised)
    torch.testing.assert_close(
        norm.denormalise(normalised), images[:, None].float() / 255, rtol=0, atol=1e-6
    )
    assert norm.denormalise(torch.tensor([-100.0, 100.0])).tolist() == [0.0, 1.0]

    with pytest.raises(TypeError):
        norm.normalise(images.float())


def test_normalisation_survives_a_weights_only_checkpoint(tmp_path):
    norm = Normalisation(mean=0.18, std=0.31)
    torch.save({"normalisation": norm.to_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert Normalisation.from_dict(loaded["normalisation"]) == norm
    with pytest.raises(ValueError):
        Normalisation(mean=0.5, std=0.0)


def test_evenly_spaced_takes_both_ends_rounds_and_never_repeats():
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(11, 4).tolist() == [0, 3, 7, 10]  # 3.33 and 6.67, rounded
    assert evenly_spaced(3, 8).tolist() == [0, 1, 2]
    assert evenly_spaced(5, 1).tolist() == [0]


def test_relative_positions_run_from_each_cases_lowest_to_its_highest_slice():
    names = ["case_001_slice_3.nii.png", "case_001_slice_7.nii.png", "case_001_slice_5.nii.png",
             "OAS1_0002_MR1_slice_40.png", "OAS1_0002_MR1_slice_140.png",
             "case_004_slice_9.nii.png", "scan.png"]
    positions = relative_positions(names)
    torch.testing.assert_close(positions[:5], torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0]))
    assert positions[5:].isnan().all()  # a case with one slice; no slice number
