"""A tiny train + predict run on a handful of real (demo) brain slices."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from brainvq import checkpoints, config
from brainvq.data.demo import build_demo_dataset
from brainvq.inference import trained_run as inference
from tools import choose_temperature, compare_priors, slice_test, texture_test

EXPECTED_METRICS = {"test_ssim", "test_psnr", "test_mse", "test_ssim_brain", "test_psnr_brain",
                    "codebook_usage", "codebook_perplexity", "prior_test_bits_per_index",
                    "codes_used_brain", "codebook_perplexity_brain", "n_test_images",
                    "prior_test_bits_brain", "c2st_accuracy", "c2st_real_vs_real",
                    "c2st_unigram", "c2st_chimera", "sample_fd", "sample_fd_real_vs_real",
                    "sample_fd_unigram", "sample_position_mae", "test_position_mae",
                    "slice_c2st", "slice_c2st_real_vs_real", "slice_c2st_unigram",
                    "slice_c2st_chimera"}


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
    decoder = torch.load(trained_run / "decoder_best.pt", weights_only=True)  # stage 1b
    assert {"model", "codebook", "vqvae_epoch", "history"} <= set(decoder)
    assert (trained_run / "loss_decoder.png").stat().st_size > 0
    assert sorted(p.name for p in (trained_run / "reconstructions").iterdir()) == [
        "decoder_epoch_001.png", "epoch_001.png", "epoch_002.png"]
    indices = torch.load(trained_run / "indices.pt", weights_only=True)
    assert indices["train"].shape == (8, 32, 32)
    assert indices["test"].shape == (4, 32, 32)
    usage = json.loads((trained_run / "codebook.json").read_text())
    assert usage["test"]["codes_used"] == len(torch.unique(indices["test"]))


def test_checkpoint_alone_rebuilds_the_models(trained_run):
    model, norm, _ = checkpoints.load_vqvae(trained_run / "vqvae_best.pt", torch.device("cpu"))
    prior = checkpoints.load_prior(trained_run / "prior_best.pt", torch.device("cpu"))
    assert model.cfg.n_codes == prior.cfg.n_codes == 32
    assert norm.std > 0


def test_compare_priors_trains_both_baselines_and_scores_the_test_split(trained_run):
    # on the CPU, as this test's own evaluation below, also where a GPU is present
    assert compare_priors.main(["--run", str(trained_run), "--device", "cpu",
                                "--n-samples", "3"]) == 0
    result = json.loads((trained_run / "prior_comparison.json").read_text())
    ours = checkpoints.load_prior(trained_run / "prior_best.pt", torch.device("cpu"))
    indices = torch.load(trained_run / "indices.pt", weights_only=True)
    assert ours.cfg.slice_bins > 0  # conditioned: scored at the test slices' positions
    with torch.no_grad():  # one batch: the 4 test grids
        bits = ours.bits_per_index(indices["test"].long(), indices["test_positions"]).item()
    assert math.isclose(result["test_bits_per_index_ours"], bits, rel_tol=1e-5)
    assert math.isclose(result["reduction"], 1 - bits / result["test_bits_per_index_seed_style"])
    assert result["params_seed_style"] < result["params_ours"]
    assert result["test_bits_per_index_ours_random_embedding"] > 0  # the tiny profile ablates
    assert 0 <= result["seed_style_c2st_accuracy"] <= 1 and result["seed_style_sample_fd"] >= 0
    assert 0 <= result["seed_style_texture_c2st"] <= 1


def test_choose_temperature_scores_each_temperature_on_both_sides_and_picks_on_validation(
        trained_run):
    assert choose_temperature.main(["--run", str(trained_run), "--device", "cpu",
                                    "--temperatures", "0.5", "1.0", "--seeds", "0", "1",
                                    "--n-samples", "3"]) == 0
    result = json.loads((trained_run / "temperature.json").read_text())
    scores = result["scores"]
    assert set(scores) == {"0.5", "1.0"}
    for sides in scores.values():
        assert set(sides) == {"validate", "test"}
        assert all(len(values) == 2 for values in sides["validate"].values() if values)
    assert result["chosen"] in (0.5, 1.0)


def test_choose_temperature_scores_each_nucleus_with_each_temperature(trained_run):
    assert choose_temperature.main(["--run", str(trained_run), "--device", "cpu",
                                    "--temperatures", "1.0", "--top-p", "0.5", "1.0",
                                    "--seeds", "0", "1", "--n-samples", "3"]) == 0
    result = json.loads((trained_run / "temperature.json").read_text())
    assert set(result["scores"]) == {"1.0 top-p 0.5", "1.0"}
    assert result["chosen"] == 1.0 and result["chosen_top_p"] in (0.5, 1.0)


def test_texture_test_scores_every_case_for_each_seed(trained_run):
    assert texture_test.main(["--run", str(trained_run), "--device", "cpu", "--seeds", "0", "1",
                              "--n-samples", "3"]) == 0
    result = json.loads((trained_run / "texture_test.json").read_text())
    assert set(result["scores"]) == set(texture_test.CASES)
    scores = result["scores"]
    # one test and one validation subject: real against real has one subject a half, and the
    # blurred slices share the real side's only subject, so no fold can be scored
    for name in ("texture_c2st_real_vs_real", "texture_c2st_blurred"):
        assert len(scores[name]) == 2 and all(math.isnan(v) for v in scores[name])
    for name in ("texture_c2st", "texture_c2st_unigram", "texture_c2st_chimera"):
        assert len(scores[name]) == 2 and all(0 <= v <= 1 for v in scores[name])


@pytest.mark.parametrize("side", ["test", "validate"])
def test_slice_test_scores_every_case_for_each_seed_on_either_side(trained_run, side):
    assert slice_test.main(["--run", str(trained_run), "--device", "cpu", "--seeds", "0", "1",
                            "--side", side]) == 0
    scores = json.loads((trained_run / f"slice_test_{side}.json").read_text())["scores"]
    assert set(scores) == {*slice_test.CASES, "slice_c2st_real_vs_real_sd"}
    # one subject a held-out split: real against real cannot be scored
    assert all(math.isnan(v) for v in scores["slice_c2st_real_vs_real"])
    for name in ("slice_c2st", "slice_c2st_unigram", "slice_c2st_chimera"):
        assert len(scores[name]) == 2 and all(0 <= v <= 1 for v in scores[name])


def test_choose_inpainting_temperature_scores_every_fill_on_both_sides(trained_run):
    assert choose_temperature.main(["--run", str(trained_run), "--device", "cpu",
                                    "--task", "inpainting", "--temperatures", "0.5", "1.0",
                                    "--seeds", "0", "1", "--n-inpaint", "2"]) == 0
    result = json.loads((trained_run / "inpaint_temperature.json").read_text())
    assert set(result["scores"]) == {"0.5", "1.0"}
    for sides in result["scores"].values():
        assert set(sides) == {"validate", "test"}
        for values in sides["validate"].values():
            assert len(values) == 2 and all(-1 <= v <= 1 for v in values)
    assert set(sides["validate"]) == {"raster_ssim", "likeliest_above_ssim", "full_ssim",
                                      "mean_ssim"}
    assert result["chosen"] in (0.5, 1.0)


def test_chosen_temperature_is_the_least_distinguishable_on_validation_beyond_noise():
    def results(low, one):
        return {"0.8": {"validate": {"c2st_accuracy": low}, "test": {"c2st_accuracy": [0.5]}},
                "1.0": {"validate": {"c2st_accuracy": one}, "test": {"c2st_accuracy": [0.9]}}}
    assert choose_temperature.chosen_temperature(results([0.6, 0.62, 0.61], [0.8, 0.79, 0.8])) \
        == 0.8
    # lower on average, but by less than the seeds' spread: the prior's own temperature stays
    assert choose_temperature.chosen_temperature(results([0.5, 0.7, 0.6], [0.6, 0.7, 0.65])) \
        == 1.0
    assert choose_temperature.chosen_temperature(results([0.7, 0.8], [0.6, 0.6])) == 1.0


def test_chosen_inpainting_temperature_is_the_best_fill_on_validation_beyond_noise():
    def results(low, one):
        return {"0.6": {"validate": {"full_ssim": low}, "test": {"full_ssim": [0.1]}},
                "1.0": {"validate": {"full_ssim": one}, "test": {"full_ssim": [0.9]}}}
    choose = choose_temperature.chosen_temperature
    assert choose(results([0.39, 0.40], [0.35, 0.36]), "full_ssim", higher_is_better=True) \
        == 0.6
    assert choose(results([0.35, 0.36], [0.39, 0.40]), "full_ssim", higher_is_better=True) \
        == 1.0
    # higher on average, but by less than the seeds' spread
    assert choose(results([0.30, 0.45], [0.36, 0.37]), "full_ssim", higher_is_better=True) \
        == 1.0


def test_chosen_setting_prefers_the_whole_distribution_among_settings_the_seeds_cannot_tell():
    def scores(validate):
        return {"validate": {"c2st_accuracy": validate}, "test": {"c2st_accuracy": [0.5]}}
    results = {"1.0 top-p 0.9": scores([0.60, 0.62]), "1.0": scores([0.59, 0.67]),
               "0.9": scores([0.80, 0.82])}
    assert choose_temperature.chosen_setting(results) == (1.0, 1.0)
    results["1.0"] = scores([0.70, 0.71])  # now the nucleus is better beyond the seeds' spread
    assert choose_temperature.chosen_setting(results) == (1.0, 0.9)
    assert choose_temperature.parse_setting(choose_temperature.setting_key(0.8, 0.95)) \
        == (0.8, 0.95)


def test_chosen_temperature_is_the_one_nearest_1_that_the_seeds_cannot_tell_from_the_best():
    def scores(validate):
        return {"validate": {"full_ssim": validate}, "test": {"full_ssim": [0.0]}}
    results = {"0.2": scores([0.420, 0.420]), "0.3": scores([0.395, 0.415]),
               "0.6": scores([0.390, 0.392]), "1.0": scores([0.360, 0.370])}
    # 0.2 is best; 0.3 is within two standard errors of it, 0.6 and 1.0 are not
    assert choose_temperature.chosen_temperature(results, "full_ssim",
                                                 higher_is_better=True) == 0.3
    del results["0.2"]  # now 0.3 is best and 0.6 within its seeds' spread
    assert choose_temperature.chosen_temperature(results, "full_ssim",
                                                 higher_is_better=True) == 0.6


@pytest.fixture(scope="module")
def predicted_run(trained_run, tmp_path_factory):
    """The tiny run after one `predict.py` with every output switched on, kept cheap."""
    folder = tmp_path_factory.mktemp("predict")
    mask = folder / "mask.npy"
    grid = np.zeros((32, 32))
    grid[10:20, 10:20] = 1
    np.save(mask, grid)
    code = predict.main(["--run", str(trained_run), "--evaluate", "--n-samples", "2",
                         "--n-show", "2", "--mask", str(mask), "--n-eval-samples", "3",
                         "--n-inpaint", "2", "--inpaint-candidates", "3", "--gibbs-sweeps", "1",
                         "--gibbs-proposals", "2", "--inpaint-temperature", "0.7", "--surprise",
                         "--n-surprise", "2", "--reconstruct-dir", str(folder / "recon")])
    assert code == 0
    return trained_run, folder / "recon"


def test_predict_writes_figures_and_metrics(predicted_run):
    run, _ = predicted_run
    figures = run / "figures"
    for name in ("reconstructions", "generated_indices", "generated_brains", "generated_stack",
                 "generated_vs_real", "inpainting_bottom_half", "inpainting_custom",
                 "inpainting_centre_square", "ssim_by_slice", "surprise"):
        assert (figures / f"{name}.png").stat().st_size > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert EXPECTED_METRICS <= set(metrics)
    assert metrics["n_test_images"] == 4
    assert 0 < metrics["test_ssim"] <= 1
    assert 0 < metrics["codebook_usage"] <= 1
    assert 0 < metrics["prior_test_bits_per_index"] < 20
    assert metrics["prior_test_bits_brain"] > 0
    for key in ("c2st_accuracy", "c2st_unigram", "c2st_chimera", "slice_c2st",
                "slice_c2st_unigram", "slice_c2st_chimera"):
        assert 0 <= metrics[key] <= 1
    # one validation and one test subject: halves of one subject, no fold can be scored
    assert math.isnan(metrics["c2st_real_vs_real"])
    assert math.isnan(metrics["slice_c2st_real_vs_real"])
    assert metrics["sample_fd"] >= 0 and 0 <= metrics["test_position_mae"] <= 1


def test_metrics_per_slice_position(predicted_run):
    metrics = json.loads((predicted_run[0] / "metrics.json").read_text())
    by_slice = metrics["per_slice_position"]
    assert list(by_slice) == ["0", "1", "2", "3"]  # the test subject's 4 slices
    for scores in by_slice.values():
        assert {"ssim", "ssim_brain", "psnr", "psnr_brain"} <= set(scores)
        assert scores["n_images"] == 1
    mean_ssim = np.mean([scores["ssim"] for scores in by_slice.values()])
    assert math.isclose(mean_ssim, metrics["test_ssim"], rel_tol=1e-9)


def test_metrics_of_samples_inpainting_and_surprise(predicted_run):
    run, _ = predicted_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["sample_nn_ssim"] <= 1 and 0 < metrics["test_nn_ssim"] <= 1
    assert 0 <= metrics["sample_diversity"] <= 2
    assert metrics["samples_memorised"] in (True, False) and metrics["n_eval_samples"] == 3
    for mask in ("bottom_half", "centre_square"):
        for method in ("raster", "likeliest_above", "full", "mean", "reconstruction"):
            assert -1 <= metrics[f"inpaint_{mask}_{method}_ssim"] <= 1
            assert metrics[f"inpaint_{mask}_{method}_psnr"] > 0
        # surprise of the context after the hole: only the centre square has one
        assert (f"inpaint_{mask}_full_context_bits" in metrics) == (mask == "centre_square")
        assert f"inpaint_{mask}_mean_context_bits" not in metrics  # an image, not a code grid
    assert metrics["inpaint_centre_square_full_context_bits"] > 0
    assert metrics["inpaint_temperature"] == 0.7  # the flag, not the generation temperature
    surprise = json.loads((run / "surprise.json").read_text())
    assert set(surprise) == {"surprise_lesion_bits", "surprise_lesion_sites_clean_bits",
                             "surprise_lesion_core_bits", "surprise_lesion_core_clean_bits",
                             "surprise_lesion_pixels_bits", "surprise_lesion_pixels_clean_bits",
                             "surprise_brain_bits", "surprise_n_images", "lesion_auprc",
                             "lesion_dice", "lesion_auprc_random_map",
                             "lesion_auprc_true_difference", "heal_threshold_bits",
                             "heal_pixel_level"}
    assert (run / "figures" / "healing.png").stat().st_size > 0
    assert surprise["lesion_auprc_true_difference"] > surprise["lesion_auprc_random_map"]
    assert all(metrics[key] == value for key, value in surprise.items())
    assert surprise["surprise_lesion_bits"] > 0 and surprise["surprise_n_images"] == 2


def test_reconstruct_dir_holds_every_test_image_as_8_bit_png(predicted_run, data_root):
    _, folder = predicted_run
    inputs = sorted(p.name for p in (data_root / "keras_png_slices_test").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == inputs
    for name in inputs:
        image = Image.open(folder / name)
        assert image.mode == "L" and image.size == (256, 256)
        assert np.asarray(image).dtype == np.uint8


def test_existing_run_is_not_overwritten(trained_run, data_root, capsys):
    before = (trained_run / "vqvae_last.pt").stat().st_mtime_ns
    code = train.main(["--data", str(data_root), "--out", str(trained_run), "--profile", "tiny",
                       "--stage", "vqvae"])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained_run / "vqvae_last.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("flag", ["--temperature", "--inpaint-temperature"])
def test_temperatures_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit):
        predict.parse_args([flag, "0"])
    assert f"{flag} must be positive" in capsys.readouterr().err
    assert predict.parse_args([flag, "0.5"]).settings.inpaint.temperature == (
        0.5 if flag == "--inpaint-temperature" else config.PredictSettings().inpaint_temperature)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_top_p_must_lie_in_0_1(value, capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--top-p", value])
    assert "--top-p must lie in (0, 1]" in capsys.readouterr().err
    assert predict.parse_args(["--top-p", "0.9"]).settings.top_p == 0.9


def test_generated_brains_are_drawn_from_the_nucleus_asked_for(trained_run, monkeypatch):
    asked = []
    original = inference.Run.sample

    def spy(self, indices, temperature, seed, positions=None, top_p=1.0):
        asked.append(top_p)
        return original(self, indices, temperature, seed, positions, top_p)

    monkeypatch.setattr(inference.Run, "sample", spy)
    assert predict.main(["--run", str(trained_run), "--n-samples", "2", "--n-show", "1",
                         "--top-p", "0.5"]) == 0
    # generated_brains, generated_stack and generated_vs_real; inpainting has its own
    assert asked == [0.5, 0.5, 0.5]


def test_inpainting_fills_at_the_inpainting_temperature(trained_run):
    run = inference.Run(trained_run, torch.device("cpu"))
    masked = torch.full((2, 32, 32), 3)
    masked[:, 10:20, 10:20] = -1
    settings = config.PredictSettings(inpaint_candidates=3, inpaint_temperature=0.05).inpaint
    fills = run.inpaint(masked, seed=2, settings=settings)
    for temperature, same in ((0.05, True), (1.0, False)):
        expected = inference.inpaint_full_context(run.prior, masked, 3,
                                                  generator=torch.Generator().manual_seed(2),
                                                  temperature=temperature)
        assert torch.equal(fills.raster, expected.raster) == same
        assert torch.equal(fills.full, expected.full) == same


def test_mean_fill_averages_each_grids_own_decoded_candidates(trained_run, monkeypatch):
    monkeypatch.setattr(inference, "MEAN_CHUNK_IMAGES", 4)  # 2 grids at a time: 2 chunks
    run = inference.Run(trained_run, torch.device("cpu"))
    candidates = torch.randint(0, run.prior.cfg.n_codes, (3, 2, 32, 32),
                               generator=torch.Generator().manual_seed(0))
    decoded = run.decode(candidates.flatten(0, 1)).reshape(3, 2, 256, 256)
    mean = run.decode_mean(candidates)
    assert mean.shape == (3, 256, 256)
    np.testing.assert_allclose(mean, decoded.mean(1), atol=1e-5)
    assert np.abs(mean - decoded[:, 0]).max() > 0.01  # both candidates count, not the first
    # where every candidate is the same grid, the mean is its decoded image
    np.testing.assert_allclose(run.decode_mean(candidates[:, :1].expand(3, 4, 32, 32)),
                               decoded[:, 0], atol=1e-5)


def test_naive_sampler_flag_gives_the_fast_samplers_grids(trained_run):
    assert predict.parse_args(["--sampler", "naive"]).sampler == "naive"
    masked = torch.full((2, 32, 32), -1)
    masked[1, :16] = 3  # inpainting: the top half given
    fast = inference.Run(trained_run, torch.device("cpu"), "fast")
    naive = inference.Run(trained_run, torch.device("cpu"), "naive")
    got = naive.sample(masked, temperature=1.0, seed=5)
    assert torch.equal(got, fast.sample(masked, temperature=1.0, seed=5))
    assert (got >= 0).all() and (got[1, :16] == 3).all()


def test_mirrored_training_slices_double_the_priors_grids(trained_run, data_root, tmp_path,
                                                          monkeypatch):
    import dataclasses
    import shutil

    import dataset
    from brainvq.inference.trained_run import encode_images
    from brainvq.training import engine, stages

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    splits = dataset.load_splits(data_root)
    indices = stages.encode_splits(run, splits, torch.device("cpu"), mirror=True)
    model, norm, _ = checkpoints.load_vqvae(run / "vqvae_best.pt", torch.device("cpu"))
    mirrored = encode_images(model, splits["train"].images.flip(-1), norm, torch.device("cpu"))
    assert torch.equal(indices[checkpoints.MIRRORED_TRAIN], mirrored)
    assert not torch.equal(mirrored, indices["train"])  # the mirror is not the slice itself
    assert torch.equal(checkpoints.split_positions(indices, checkpoints.MIRRORED_TRAIN),
                       checkpoints.split_positions(indices, "train"))
    seen = {}
    monkeypatch.setattr(engine, "fit", lambda stage, *_: seen.update(n=stage.n_samples))
    settings = config.PROFILES["tiny"]
    for mirror in (False, True):
        stage = dataclasses.replace(settings.prior_stage, mirror=mirror)
        stages.train_prior(settings.prior, stage, indices,
                           stages.RunOptions(run=run, overwrite=True), torch.device("cpu"))
        assert seen["n"] == len(splits["train"]) * (2 if mirror else 1)


def test_attention_probe_reports_each_variant_beside_its_control(trained_run, capsys):
    from tools import attention_probe

    assert attention_probe.main(["--run", str(trained_run), "--steps", "2", "--after", "1"]) == 0
    rows = json.loads((trained_run / "attention_probe.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == [
        "preset", "attention after 1", "control: attention sees every site"]
    assert all(row["steps"] == 2 and 0 < row["val_bits_brain"] < 10 for row in rows)
    assert "attention after 1" in capsys.readouterr().out


def test_the_levels_beside_real_are_spread_and_known():
    from brainvq.figures.run_figures import spread_levels

    positions = torch.tensor([float("nan"), 0.0, 0.12, 0.5, 0.52, 0.88, 1.0])
    assert spread_levels(positions, 3).tolist() == [2, 3, 5]  # nearest to 0.1, 0.5, 0.9
    assert spread_levels(torch.full((4,), float("nan")), 3).tolist() == [0, 1, 2]
