"""Data parallelism under torchrun (2 CPU processes, gloo): what it guarantees, checked on
every kernel set, and that train.py runs under it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"
# No GPU for these processes, also on a machine that has one: the test is about gloo on the CPU,
# and NCCL would want a GPU per process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# In float64 the two runs differ only in summation order (a shard's sums, then the all-reduce,
# against one sum over the global batch): ~1e-16 relative per operation. Three SGD steps grow
# that by a few orders at most, so 1e-9 leaves a wide margin while a real disagreement (ranks
# that skip the all-reduce, or train on the wrong part of the batch) shows at 1e-3 and above.
TOLERANCE = 1e-9


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _worker(out: Path, processes: int) -> dict:
    """The worker's results: {"none" | "no-sync" | "same-shard": grads and states}."""
    launcher = TORCHRUN if processes > 1 else [sys.executable]
    _run([*launcher, str(WORKER), str(out)])
    result = torch.load(out, weights_only=True)
    assert result["world_size"] == processes
    return result


def _largest_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest |a − b| over every tensor both results hold, and where it is."""
    worst = (0.0, "")
    for part in ("vqvae_grads", "vqvae_state", "prior_grads", "prior_state"):
        assert a[part].keys() == b[part].keys(), part
        for key, value in a[part].items():
            if value.is_floating_point():
                gap = (value - b[part][key]).abs().max().item()
                worst = max(worst, (gap, f"{part}.{key}"))
            else:
                assert torch.equal(value, b[part][key]), f"{part}.{key}"
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return _worker(folder / "one.pt", 1), _worker(folder / "two.pt", 2)


def test_two_ranks_compute_the_gradients_and_steps_of_one_process(runs):
    one, two = runs
    gap, where = _largest_difference(one["none"], two["none"])
    assert gap < TOLERANCE, f"{where} differs by {gap:.2e}"
    # the comparison covers the EMA codebook statistics and the quantiser's restarts
    assert {"quantiser.ema_count", "quantiser.ema_sum", "quantiser.codebook"} <= set(
        two["none"]["vqvae_state"])


@pytest.mark.parametrize("broken", ["no-sync", "same-shard"])
def test_the_equivalence_check_fails_when_ranks_disagree(runs, broken):
    one, two = runs
    assert _largest_difference(one["none"], one[broken])[0] < TOLERANCE  # no-ops on 1 process
    gap, where = _largest_difference(one["none"], two[broken])
    assert gap > 1e3 * TOLERANCE, f"breaking {broken} went unseen (largest gap {gap:.2e})"


def test_train_py_runs_under_torchrun(tiny_data_root, tmp_path):
    out = _run([*TORCHRUN, "train.py", "--data", str(tiny_data_root), "--out", str(tmp_path),
                "--profile", "tiny", "--vqvae-epochs", "1", "--prior-epochs", "1",
                "--batch-size", "8"])
    assert "processes 2" in out.stdout
    for stage in ("vqvae", "prior"):
        state = torch.load(tmp_path / f"{stage}_last.pt", weights_only=True)
        assert state["epoch"] == 1 and len(state["history"]) == 1
