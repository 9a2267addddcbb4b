"""train.py meets bad data folders with one line naming the path, exit code 2, no traceback."""
import numpy as np
import pytest
from PIL import Image

import train

SPLITS = ("keras_png_slices_train", "keras_png_slices_validate", "keras_png_slices_test")


def _oasis(root, corrupt=False, empty_test=False):
    for split in SPLITS:
        (root / split).mkdir(parents=True)
        if empty_test and split.endswith("test"):
            continue
        Image.fromarray(np.zeros((256, 256), np.uint8)).save(
            root / split / "case_001_slice_0.nii.png")
    if corrupt:
        (root / SPLITS[0] / "case_001_slice_1.nii.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "keras_png_slices_train"),
    (lambda p: _oasis(p, empty_test=True), "keras_png_slices_test"),
    (lambda p: _oasis(p, corrupt=True), "case_001_slice_1.nii.png"),
])
def test_bad_data_root(tmp_path, capsys, make, expected):
    root = make(tmp_path)
    code = train.main(["--data", str(root), "--out", str(tmp_path / "run"), "--profile", "tiny"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
