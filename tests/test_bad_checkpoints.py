"""Damaged, foreign and unsafe checkpoints are refused with one clear line (exit code 2)."""
import os
import shutil

import pytest
import torch

import predict
import train


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def run(tiny_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.main(["--data", str(tiny_data_root), "--out", str(out), "--profile", "tiny",
                       "--batch-size", "4"]) == 0
    return out


def _copy(run, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def test_truncated_checkpoint(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    data = (copy / "vqvae_best.pt").read_bytes()
    (copy / "vqvae_best.pt").write_bytes(data[: len(data) // 2])
    assert predict.main(["--run", str(copy), "--n-samples", "1", "--n-show", "1"]) == 2
    err = capsys.readouterr().err
    assert "vqvae_best.pt cannot be loaded safely" in err and "Traceback" not in err


def test_checkpoint_carrying_pickled_code_is_refused(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    state = torch.load(copy / "prior_best.pt", weights_only=True)
    state["hook"] = Payload()
    torch.save(state, copy / "prior_best.pt")
    assert predict.main(["--run", str(copy), "--n-samples", "1", "--n-show", "1"]) == 2
    assert "prior_best.pt cannot be loaded safely" in capsys.readouterr().err


def test_resume_with_a_different_config_is_refused(run, tiny_data_root, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    before = (copy / "vqvae_last.pt").read_bytes()
    code = train.main(["--data", str(tiny_data_root), "--out", str(copy), "--profile", "tiny",
                       "--batch-size", "4", "--n-codes", "64", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit this configuration" in err and "--overwrite" in err
    assert (copy / "vqvae_last.pt").read_bytes() == before


def test_resume_with_another_schedule_is_refused_before_anything_is_written(
        run, tiny_data_root, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    before = {path.name: path.read_bytes() for path in copy.glob("*.pt")}
    code = train.main(["--data", str(tiny_data_root), "--out", str(copy), "--profile", "tiny",
                       "--batch-size", "4", "--stage", "prior", "--prior-mirror", "--resume"])
    assert code == 2
    assert "was trained with mirror False (now True)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in copy.glob("*.pt")} == before


def test_missing_run_folder(tmp_path, capsys):
    assert predict.main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err
