"""torchrun with 2 CPU processes (gloo) computes what one process computes with the same
global batch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset import build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
# A random prior embedding: the codebook-started one is a PCA of the codebook, and the tiny
# codebook's near-equal components would turn the runs' last-digit VQ-VAE differences into
# different embeddings.
ARGS = ["--profile", "tiny", "--vqvae-epochs", "1", "--prior-epochs", "1", "--batch-size", "8",
        "--seed", "2", "--prior-embedding", "random"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "oasis", n_train=2,
                              n_validate=1, n_test=1, slices_per_subject=4)


def _run(cmd):
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_two_gloo_processes_match_one_process(data_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "train.py", "--data", str(data_root), "--out", str(one), *ARGS])
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "train.py", "--data", str(data_root), "--out", str(two),
                *ARGS])
    assert "processes 2" in out.stdout
    for stage in ("vqvae", "prior"):
        a = torch.load(one / f"{stage}_last.pt", weights_only=True)
        b = torch.load(two / f"{stage}_last.pt", weights_only=True)
        assert a["history"][0].keys() == b["history"][0].keys()
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"{stage}.{key}")
        for key in ("val_recon", "val_bits_per_index", "codebook_usage"):
            if key in a["history"][0]:
                assert abs(a["history"][0][key] - b["history"][0][key]) < 1e-4
