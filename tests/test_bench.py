import json

import pytest
import torch

from brainvq.config import PROFILES
from brainvq.evaluation.baselines import SeedStyleVQVAE
from tools import bench
from tools.bench import extrapolate_naive, render_markdown


def test_seed_style_baseline_trains_on_a_tiny_batch():
    torch.manual_seed(0)
    model = SeedStyleVQVAE(dim=8, n_codes=16)
    x = torch.rand(2, 1, 32, 32)
    reconstruction, vq_loss = model(x)
    assert reconstruction.shape == x.shape
    (torch.nn.functional.mse_loss(reconstruction, x) + vq_loss).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert model.codebook.weight.grad.abs().sum() > 0


def test_naive_extrapolation_sums_a_linear_cost_over_every_site():
    # 2 probe sites per row, each costing (rows seen) seconds: the sum over a 32×32 grid
    probe_s = {row: 2.0 * (row + 1) for row in (0, 15, 31)}
    assert abs(extrapolate_naive(probe_s) - 32 * sum(range(1, 33))) < 1e-6


def test_markdown_renders_a_small_result_as_tables():
    results = {
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0", "python": "3.11",
                    "threads": 1, "device": "cpu", "load_average": [0.5, 0.5, 0.5]},
        "quick": True,
        "sampling": {"note": "A note.", "rows": [
            {"batch": 16, "naive_s": 100.0, "naive_extrapolated": True, "fast_s": 1.0,
             "speedup": 100.0, "floor_s": 0.5, "fast_over_floor": 2.0, "exact_match": True,
             "peak_rss_mb": {"naive": 300.0, "fast": 310.0, "floor": 320.0}}]},
        "training": {"epochs": 1, "subset": True, "n_train": 256, "definition": "Defined",
                     "epoch_time_ratio": 0.4, "val_ssim_all_black": 0.6,
                     "project": {"epoch_mean_s": 4.0, "images_per_s": 64.0, "steps": 16,
                                 "val_ssim": 0.5, "peak_rss_mb": 900.0, "n_validate": 160},
                     "baseline": {"epoch_mean_s": 10.0, "images_per_s": 25.6, "steps": 2,
                                  "val_ssim": 0.4, "peak_rss_mb": 1900.0, "n_validate": 160}},
    }
    text = render_markdown(results)
    assert text.startswith("### Performance")
    assert "Test CPU (2 cores" in text and "torch 2.13.0" in text
    assert "| 16 | 100.0* | 1.00 | 100× | 0.50 | 2.0 | yes | 300 / 310 / 320 |" in text
    assert "| 4.0 | 64.0 | 16 | 0.500 | 900 |" in text
    assert "0.40 (target ≤ 0.5)" in text
    # the sampling table alone renders too
    del results["training"]
    assert "VQ-VAE training" not in render_markdown(results)


@pytest.fixture
def restores_threads():
    """bench.main sets this process's threads; later in-process training compares bitwise with
    subprocesses at the default count, so the count is put back after each bench test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sampling_bench_measures_the_chosen_profiles_prior(tmp_path, restores_threads):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--part", "sampling", "--profile", "tiny", "--batches",
                       "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    tiny = PROFILES["tiny"].prior
    assert results["profile"] == "tiny"
    assert results["sampling"]["prior"]["channels"] == tiny.channels
    assert "the tiny prior" in results["sampling"]["note"]
    assert [row["batch"] for row in results["sampling"]["rows"]] == [1]
    assert "partial" not in results  # a finished run's file is whole
    assert "--profile tiny" in render_markdown(results)


def test_a_bench_stopped_midway_leaves_its_rows_so_far(tmp_path, monkeypatch, restores_threads):
    out = tmp_path / "bench.json"
    real = bench.bench_sampling

    def stopped_at_batch_2(cfg, batch, *args):
        if batch == 2:
            raise KeyboardInterrupt  # any stop mid-run: the file must already hold batch 1
        return real(cfg, batch, *args)

    monkeypatch.setattr(bench, "bench_sampling", stopped_at_batch_2)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--part", "sampling", "--profile", "tiny", "--batches",
                    "1", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["partial"] is True
    assert [row["batch"] for row in results["sampling"]["rows"]] == [1]
    assert "Partial" in render_markdown(results)


def test_whole_slice_training_covers_every_pixel():
    assert bench.pixel_share({"crop": 0, "crops_per_image": 1}) == 1.0
    assert bench.pixel_share({"crop": 128, "crops_per_image": 2}) == 0.5
