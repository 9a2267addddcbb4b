"""Exact resume after SIGKILL, graceful SIGTERM, and the NaN guard (tiny runs, CPU)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from brainvq.data.demo import build_demo_dataset
from brainvq.training import engine, stages

REPO = Path(__file__).resolve().parents[1]
TINY = ["--profile", "tiny", "--vqvae-epochs", "2", "--prior-epochs", "1", "--batch-size", "4",
        "--checkpoint-every", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "oasis", n_train=2,
                              n_validate=1, n_test=1, slices_per_subject=4)


def _train(data_root, out, *extra):
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(data_root), "--out", str(out),
           *TINY, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _weights(run):
    return {stage: torch.load(run / f"{stage}_last.pt", weights_only=True)["model"]
            for stage in ("vqvae", "decoder", "prior")}


def _assert_bitwise_equal(a, b):
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for key in a[stage]:
            assert torch.equal(a[stage][key], b[stage][key]), f"{stage}.{key} differs"


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "whole"
    proc = _train(data_root, run)
    first_checkpoint = _wait_for_first_checkpoint(proc, run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run, time.time() - first_checkpoint  # how long the run goes on after it


def _wait_for_first_checkpoint(proc, run):
    while not (run / "vqvae_last.pt").exists() and proc.poll() is None:
        time.sleep(0.02)
    return time.time()


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_exact(data_root, uninterrupted,
                                                                 tmp_path):
    whole, seconds = uninterrupted
    rng = random.Random()
    delay = rng.uniform(0, seconds * 0.7)
    for attempt in range(4):  # a busy machine can make this run quicker than the first one
        run = tmp_path / f"killed{attempt}"
        proc = _train(data_root, run)
        _wait_for_first_checkpoint(proc, run)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            break
        delay /= 2
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill after {delay:.2f}s"
    resumed = _train(data_root, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_bitwise_equal(_weights(whole), _weights(run))


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(data_root, uninterrupted,
                                                             tmp_path):
    whole, _ = uninterrupted
    run = tmp_path / "stopped"
    proc = _train(data_root, run)
    _wait_for_first_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    resumed = _train(data_root, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_bitwise_equal(_weights(whole), _weights(run))


class Killed(Exception):
    """Stands for SIGKILL between two checkpoint writes."""


def test_killed_between_the_best_and_last_writes_resumes_exactly(data_root, uninterrupted,
                                                                  tmp_path, monkeypatch):
    # The VQ-VAE's last epoch is its best: a kill between writing its two checkpoints must not
    # leave a stale vqvae_best.pt, which the prior's indices are encoded with.
    whole, _ = uninterrupted
    history = torch.load(whole / "vqvae_last.pt", weights_only=True)["history"]
    assert min(history, key=lambda row: row["val_recon"])["epoch"] == len(history)
    real_save, writes = engine.save_checkpoint, []

    def killed_after_first_write_of_the_last_epoch(state, path):
        at_epoch_end = state["epoch"] == len(history) and state["step_in_epoch"] == 0
        if at_epoch_end and path.name.startswith("vqvae") and writes:
            raise Killed
        real_save(state, path)
        if at_epoch_end and path.name.startswith("vqvae"):
            writes.append(path.name)

    monkeypatch.setattr(engine, "save_checkpoint", killed_after_first_write_of_the_last_epoch)
    run = tmp_path / "killed"
    with pytest.raises(Killed):
        train.main(["--data", str(data_root), "--out", str(run), *TINY])
    monkeypatch.undo()
    resumed = _train(data_root, run, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _assert_bitwise_equal(_weights(whole), _weights(run))
    best = [torch.load(folder / "vqvae_best.pt", weights_only=True)["model"]
            for folder in (whole, run)]
    _assert_bitwise_equal({"vqvae": best[0]}, {"vqvae": best[1]})


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(data_root, tmp_path,
                                                                      monkeypatch, capsys):
    real = stages.vqvae_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(stages, "vqvae_losses", poisoned)
    run = tmp_path / "nan"
    code = train.main(["--data", str(data_root), "--out", str(run), *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "vqvae loss became nan at vqvae epoch 1 step 4" in err
    state = torch.load(run / "vqvae_last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert os.listdir(run)  # nothing half-written is left as a checkpoint
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
