"""The offline demo set built from the MNI152 template, and its noise-free test slices."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.data import demo
from brainvq.data.demo import build_demo_dataset, demo_subject_with_clean, load_template
from brainvq.data.slices import IMAGE_SIZE, DatasetError, case_id
from dataset import OASIS_SPLIT_DIRS, load_splits


def make_real_root(root):
    """An OASIS-layout root of one blank slice per split, as real data would be: no demo marker."""
    for (folder,) in OASIS_SPLIT_DIRS.values():
        (root / folder).mkdir(parents=True)
        blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        Image.fromarray(blank).save(root / folder / "case_001_slice_0.nii.png")
    return root


TINY = {"n_train": 2, "n_validate": 1, "n_test": 1, "slices_per_subject": 4}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), **TINY)


def test_demo_has_oasis_layout_and_brain_like_images(tiny_demo):
    assert (tiny_demo / ".complete").is_file()
    splits = load_splits(tiny_demo)
    assert [len(s) for s in splits.values()] == [8, 4, 4]
    assert splits["train"].names[:4] == [f"case_001_slice_{k}.nii.png" for k in range(4)]
    for slices in splits.values():
        images = slices.images
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
        border = torch.cat(
            [
                images[:, :8].flatten(),
                images[:, -8:].flatten(),
                images[..., :8].flatten(),
                images[..., -8:].flatten(),
            ]
        )
        assert border.max() == 0  # background is exactly 0 and the brain is not cut off
        brain_fraction = (images > 0).float().mean((1, 2))
        assert brain_fraction.min() > 0.05
        assert images.max() >= 200

    cases = {split: {case_id(name) for name in s.names} for split, s in splits.items()}
    assert cases == {"train": {"001", "002"}, "validate": {"003"}, "test": {"004"}}


def test_demo_is_reused_not_rebuilt(tiny_demo):
    files = sorted(tiny_demo.rglob("*.png"))
    before = [path.stat().st_mtime_ns for path in files]
    assert build_demo_dataset(tiny_demo, **TINY) == tiny_demo
    assert [path.stat().st_mtime_ns for path in files] == before


def test_demo_is_deterministic_and_depends_on_seed(tiny_demo, tmp_path):
    small = {**TINY, "n_train": 1, "slices_per_subject": 4}
    threads = torch.get_num_threads()
    same = load_splits(build_demo_dataset(tmp_path / "same", **small))
    assert torch.get_num_threads() == threads  # the build's single-thread setting is undone
    assert torch.equal(
        same["train"].images, load_splits(tiny_demo)["train"].images[:4]
    )  # case 001 alike

    other = load_splits(build_demo_dataset(tmp_path / "other", **small, seed=1))
    assert not torch.equal(same["train"].images, other["train"].images)

    rebuilt = load_splits(
        build_demo_dataset(tmp_path / "same", **small, seed=1)
    )  # new settings: rebuilt
    assert torch.equal(rebuilt["train"].images, other["train"].images)


def test_demo_built_in_several_processes_is_the_same_set(tmp_path, monkeypatch):
    # Split between two processes (one spawned: this takes a few seconds) or built in one.
    settings = {"n_train": 14, "n_validate": 1, "n_test": 1, "slices_per_subject": 1}
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 1)
    alone = load_splits(build_demo_dataset(tmp_path / "alone", **settings))
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo, "SUBJECTS_PER_PROCESS", 8)
    shared = load_splits(build_demo_dataset(tmp_path / "shared", **settings))
    for split in ("train", "validate", "test"):
        assert shared[split].names == alone[split].names
        assert torch.equal(shared[split].images, alone[split].images)


def test_extra_training_subjects_leave_the_held_out_splits_as_they_were(tiny_demo, tmp_path):
    more = load_splits(build_demo_dataset(tmp_path / "more", **TINY, extra_train=1))
    plain = load_splits(tiny_demo)
    for split in ("validate", "test"):
        assert more[split].names == plain[split].names
        assert torch.equal(more[split].images, plain[split].images)
    cases = sorted({case_id(name) for name in more["train"].names})
    held_out = {case_id(name) for split in ("validate", "test") for name in plain[split].names}
    assert len(cases) == TINY["n_train"] + 1 and not held_out & set(cases)
    assert torch.equal(more["train"].images[: len(plain["train"])], plain["train"].images)


def test_demo_refuses_to_overwrite_real_data(tmp_path):
    make_real_root(tmp_path)
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        build_demo_dataset(tmp_path, **TINY)


def test_noise_free_demo_slices_match_the_noisy_ones_but_for_the_noise():
    noisy, clean = demo_subject_with_clean(load_template(), np.random.default_rng([0, 3]), 2)
    difference = noisy.astype(int) - clean
    brain = clean > 0
    assert np.abs(difference[~brain]).max() <= 1  # background: noise clamped away
    assert 1 < difference[brain].std() < 12  # inside: a few grey levels of noise
    assert abs(difference[brain].mean()) < 1


def test_noise_ceiling_script_writes_its_scores(tmp_path, monkeypatch):
    from tools import noise_ceiling

    monkeypatch.setattr(demo, "DEMO_TEST_SUBJECTS", 1)
    monkeypatch.setattr(demo, "DEMO_SLICES_PER_SUBJECT", 2)
    assert noise_ceiling.main(["--out", str(tmp_path / "c.json")]) == 0
    scores = json.loads((tmp_path / "c.json").read_text())
    assert scores["n_test_images"] == 2
    assert 0.5 < scores["test_ssim_brain"] < scores["test_ssim"] < 1


def test_oasis_sized_demo_has_the_course_split_sizes():
    slices = {split: n * demo.DEMO_SLICES_PER_SUBJECT
              for split, n in demo.OASIS_SIZED_SUBJECTS.items()}
    assert slices == {"train": 9664, "validate": 1120, "test": 544}


def test_oasis_size_flag_builds_at_the_root_given(tmp_path, monkeypatch, capsys):
    from tools import demo_data

    monkeypatch.setattr(demo_data, "OASIS_SIZED_SUBJECTS", {"train": 2, "validate": 1, "test": 1})
    demo_data.main(["--oasis-size", str(tmp_path / "full")])
    assert {split: len(s) for split, s in load_splits(tmp_path / "full").items()} == {
        "train": 64, "validate": 32, "test": 32}
    assert "train: 64 slices from 2 cases" in capsys.readouterr().out


def test_templates_can_come_from_a_folder_instead_of_nilearn(tmp_path, monkeypatch):
    # A machine without nilearn (the GPU machine) reads the three files from $DEMO_TEMPLATES.
    for name in demo.TEMPLATE_FILES.values():
        (tmp_path / name).symlink_to(demo.template_dir() / name)
    monkeypatch.setenv("DEMO_TEMPLATES", str(tmp_path))
    assert demo.template_dir() == tmp_path
    (tmp_path / demo.TEMPLATE_FILES["wm"]).unlink()
    demo.load_template.cache_clear()
    try:
        with pytest.raises(DatasetError, match="DEMO_TEMPLATES"):
            demo.load_template()
    finally:
        demo.load_template.cache_clear()
