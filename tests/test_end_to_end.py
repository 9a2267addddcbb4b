"""A tiny train + predict run on a handful of real (demo) brain slices."""
import json

import pytest
import torch

import predict
import train
from dataset import build_demo_dataset

EXPECTED_METRICS = {"test_ssim", "test_psnr", "test_mse", "test_ssim_brain", "test_psnr_brain",
                    "codebook_usage", "codebook_perplexity", "prior_test_bits_per_index",
                    "n_test_images"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "oasis", n_train=2,
                              n_validate=1, n_test=1, slices_per_subject=4)


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    code = train.main(["--data", str(data_root), "--out", str(run), "--profile", "tiny",
                       "--vqvae-epochs", "2", "--prior-epochs", "2", "--batch-size", "4",
                       "--seed", "1"])
    assert code == 0
    return run


def test_training_writes_checkpoints_logs_and_figures(trained_run):
    for stage in ("vqvae", "prior"):
        for which in ("last", "best"):
            state = torch.load(trained_run / f"{stage}_{which}.pt", weights_only=True)
            assert {"model", "optimiser", "epoch", "model_config", "history"} <= set(state)
        history = json.loads((trained_run / f"history_{stage}.json").read_text())
        assert [row["epoch"] for row in history] == [1, 2]
        assert (trained_run / f"history_{stage}.csv").is_file()
        assert (trained_run / f"loss_{stage}.png").stat().st_size > 0
    assert "normalisation" in torch.load(trained_run / "vqvae_best.pt", weights_only=True)
    assert sorted(p.name for p in (trained_run / "reconstructions").iterdir()) == [
        "epoch_001.png", "epoch_002.png"]
    indices = torch.load(trained_run / "indices.pt", weights_only=True)
    assert indices["train"].shape == (8, 32, 32)
    assert indices["test"].shape == (4, 32, 32)


def test_checkpoint_alone_rebuilds_the_models(trained_run):
    model, norm, _ = train.load_vqvae(trained_run / "vqvae_best.pt", torch.device("cpu"))
    prior = predict.load_prior(trained_run / "prior_best.pt", torch.device("cpu"))
    assert model.cfg.n_codes == prior.cfg.n_codes == 32
    assert norm.std > 0


def test_predict_writes_figures_and_metrics(trained_run, tmp_path):
    mask = tmp_path / "mask.npy"
    grid = torch.zeros(32, 32)
    grid[10:20, 10:20] = 1
    import numpy as np
    np.save(mask, grid.numpy())
    code = predict.main(["--run", str(trained_run), "--evaluate", "--n-samples", "2",
                         "--n-show", "2", "--mask", str(mask)])
    assert code == 0
    figures = trained_run / "figures"
    for name in ("reconstructions", "generated_indices", "generated_brains",
                 "inpainting_bottom_half", "inpainting_custom"):
        assert (figures / f"{name}.png").stat().st_size > 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert EXPECTED_METRICS <= set(metrics)
    assert metrics["n_test_images"] == 4
    assert 0 < metrics["test_ssim"] <= 1
    assert 0 < metrics["codebook_usage"] <= 1
    assert 0 < metrics["prior_test_bits_per_index"] < 20


def test_existing_run_is_not_overwritten(trained_run, data_root, capsys):
    before = (trained_run / "vqvae_last.pt").stat().st_mtime_ns
    code = train.main(["--data", str(data_root), "--out", str(trained_run), "--profile", "tiny",
                       "--stage", "vqvae"])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained_run / "vqvae_last.pt").stat().st_mtime_ns == before
