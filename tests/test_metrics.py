import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from brainvq.evaluation.metrics import (
    batch_scores,
    brain_mask,
    codebook_stats,
    image_scores,
    masked_scores,
    mean_scores,
    ssim,
    ssim_of_pairs,
    ssim_psnr_per_image,
    ssim_torch,
)


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    ref = np.zeros((64, 64))
    ref[16:48, 12:52] = rng.uniform(0.3, 1.0, (32, 40))
    noisy = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    return ref, noisy


def test_whole_image_scores_agree_with_scikit_image():
    ref, img = _pair()
    scores = image_scores(ref, img)
    expected_ssim = structural_similarity(ref, img, data_range=1.0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
    assert math.isclose(scores["ssim"], expected_ssim, rel_tol=1e-9)
    assert math.isclose(scores["psnr"], peak_signal_noise_ratio(ref, img, data_range=1.0),
                        rel_tol=1e-9)
    assert math.isclose(scores["mse"], float(np.mean((ref - img) ** 2)), rel_tol=1e-9)


def test_brain_scores_ignore_the_background():
    ref, img = _pair()
    scores = image_scores(ref, img)
    # the noise also lands on the background, which the brain mask only touches at its rim
    mask = brain_mask(ref)
    assert mask.sum() < mask.size
    assert scores["ssim_brain"] != scores["ssim"]
    clean_background = img.copy()
    clean_background[~mask] = ref[~mask]
    assert math.isclose(image_scores(ref, clean_background)["psnr_brain"], scores["psnr_brain"])


def test_brain_mask_survives_a_float_round_trip_of_the_background():
    ref = np.zeros((32, 32))
    ref[10:20, 10:20] = 0.8
    assert brain_mask(ref + 1e-9).sum() == brain_mask(ref).sum() < ref.size


def test_identical_images_score_perfectly():
    ref, _ = _pair()
    scores = image_scores(ref, ref)
    assert scores["ssim"] == 1.0 and scores["psnr"] == float("inf")


def test_batch_and_mean_scores():
    ref, img = _pair()
    rows = batch_scores(torch.tensor(np.stack([ref, ref]))[:, None],
                        torch.tensor(np.stack([ref, img]))[:, None])
    assert rows[0]["ssim"] == 1.0
    assert math.isclose(mean_scores(rows)["ssim"], (1.0 + rows[1]["ssim"]) / 2)


def test_codebook_stats():
    uniform = torch.arange(8).repeat(10)
    stats = codebook_stats(uniform, 16)
    assert stats["codebook_usage"] == 0.5 and stats["dead_codes"] == 8
    assert math.isclose(stats["codebook_perplexity"], 8.0)
    assert math.isclose(codebook_stats(torch.zeros(5, dtype=torch.long), 4)[
        "codebook_perplexity"], 1.0)


def _region():
    mask = np.zeros((64, 64), dtype=bool)
    mask[24:40, 20:44] = True
    return mask


def test_masked_scores_are_perfect_for_a_perfect_completion():
    ref, _ = _pair()
    scores = masked_scores(ref, ref.copy(), _region())
    assert scores == {"ssim": 1.0, "psnr": float("inf")}


def test_masked_scores_ignore_the_pixels_outside_the_mask():
    ref, noisy = _pair()
    mask = _region()
    completed = np.where(mask, noisy, ref)
    wrong_outside = np.where(mask, noisy, 1 - ref)
    assert masked_scores(ref, completed, mask) == masked_scores(ref, wrong_outside, mask)
    scores = masked_scores(ref, completed, mask)
    assert scores["ssim"] < 1
    assert math.isclose(scores["psnr"], 10 * math.log10(1 / np.mean((ref - noisy)[mask] ** 2)))
    # a bad fill inside the mask scores lower than a good one
    assert masked_scores(ref, np.where(mask, 0.0, ref), mask)["ssim"] < scores["ssim"]


def test_ssim_matches_the_map_version():
    ref, img = _pair()
    assert math.isclose(ssim(ref, img), image_scores(ref, img)["ssim"], rel_tol=1e-12)


def test_differentiable_ssim_matches_scikit_image():
    rng = np.random.default_rng(3)
    ref = rng.random((2, 1, 40, 48))
    img = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1)
    expected = np.mean([ssim(r[0], i[0]) for r, i in zip(ref, img, strict=True)])
    got = ssim_torch(torch.from_numpy(ref), torch.from_numpy(img).requires_grad_())
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    got.backward()  # it is a loss: gradients must flow


def test_ssim_of_pairs_matches_scikit_image_on_uint8_images():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (3, 40, 48), dtype=np.uint8)
    b = np.clip(np.concatenate([a, a]) + rng.integers(-40, 40, (6, 40, 48)), 0, 255).astype(
        np.uint8)
    pairs = torch.tensor([[0, 0], [0, 4], [2, 1], [1, 5], [2, 2]])
    got = ssim_of_pairs(torch.from_numpy(a), torch.from_numpy(b), pairs, chunk=2)
    expected = [ssim(a[i] / 255, b[j] / 255) for i, j in pairs.tolist()]
    assert np.allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert math.isclose(ssim_of_pairs(torch.from_numpy(a), torch.from_numpy(a),
                                      torch.tensor([[1, 1]])).item(), 1.0, rel_tol=1e-6)


def test_differentiable_ssim_keeps_fp32_under_autocast():
    # Under bf16 autocast (the GPU default) its convolutions would run in bf16, and the
    # variances E[x²] − E[x]² would lose almost every significant digit.
    rng = np.random.default_rng(4)
    ref = torch.from_numpy(rng.random((2, 1, 40, 48), dtype=np.float32))
    img = (ref + 0.02 * torch.from_numpy(rng.standard_normal((2, 1, 40, 48), dtype=np.float32)))
    expected = ssim_torch(ref, img)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = ssim_torch(ref, img)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-6)


def test_per_image_ssim_and_psnr_match_scikit_image():
    # What validation during training reports, computed on the model's device in fp32.
    pairs = [_pair(seed) for seed in range(3)]
    ref = torch.tensor(np.stack([r for r, _ in pairs]), dtype=torch.float32)[:, None]
    img = torch.tensor(np.stack([i for _, i in pairs]), dtype=torch.float32)[:, None]
    ssim_values, psnr_values = ssim_psnr_per_image(ref, img)
    expected = [image_scores(r, i) for r, i in pairs]
    assert np.allclose(ssim_values.numpy(), [row["ssim"] for row in expected], rtol=1e-5)
    assert np.allclose(psnr_values.numpy(), [row["psnr"] for row in expected], rtol=1e-5)
    same_ssim, same_psnr = ssim_psnr_per_image(ref, ref)
    assert np.allclose(same_ssim.numpy(), 1.0, rtol=1e-6) and torch.isinf(same_psnr).all()
