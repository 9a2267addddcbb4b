"""Image and codebook metrics on cases with answers known in closed form: PSNR of a constant
error, SSIM of two flat images (luminance term only), the Gaussian window's shape, the map's
NaN border, the brain mask's threshold and reach, perplexity of a known histogram. Float64
where the metric allows it; tolerances everywhere a kernel runs."""
import math

import numpy as np
import pytest
import torch

from brainvq.evaluation.metrics import (
    BACKGROUND_LEVEL,
    _banded,
    _gaussian_kernel,
    _gaussian_window,
    _gaussian_window_by_matmul,
    _unit_tensor,
    batch_scores,
    brain_mask,
    codebook_stats_from_counts,
    image_scores,
    masked_scores,
    mean_scores,
    psnr,
    ssim,
    ssim_of_pairs,
    ssim_psnr_per_image,
    ssim_torch,
    ssim_with_map,
)

C1, C2 = 0.01 ** 2, 0.03 ** 2


def flat_ssim(a: float, b: float) -> float:
    """SSIM of two constant images: no variance, so only the luminance term is left."""
    return (2 * a * b + C1) / (a * a + b * b + C1)


def test_psnr_of_a_constant_error_and_of_the_masked_pixels_only():
    reference = np.zeros((8, 8))
    assert math.isclose(psnr(reference, reference + 0.1), 20.0, rel_tol=1e-12)
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4] = True
    image = np.where(mask, 0.01, 0.5)
    assert math.isclose(psnr(reference, image, mask), 40.0, rel_tol=1e-12)
    assert psnr(reference, reference) == float("inf")


def test_per_image_psnr_and_ssim_of_flat_images():
    reference = torch.full((2, 1, 20, 24), 0.2, dtype=torch.float64)
    image = torch.stack([torch.full((1, 20, 24), value, dtype=torch.float64)
                         for value in (0.3, 0.6)])
    ssim_values, psnr_values = ssim_psnr_per_image(reference, image)
    torch.testing.assert_close(psnr_values, torch.tensor([20.0, 10 * math.log10(1 / 0.16)],
                                                         dtype=torch.float64))
    expected = torch.tensor([flat_ssim(0.2, 0.3), flat_ssim(0.2, 0.6)], dtype=torch.float64)
    torch.testing.assert_close(ssim_values, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ssim_torch(reference, image), expected.mean(), rtol=1e-9,
                               atol=1e-12)


def test_every_ssim_agrees_on_flat_images():
    a, b = np.full((16, 18), 0.25), np.full((16, 18), 0.7)
    assert math.isclose(ssim(a, b), flat_ssim(0.25, 0.7), rel_tol=1e-9)
    assert math.isclose(image_scores(a, b)["ssim"], flat_ssim(0.25, 0.7), rel_tol=1e-9)
    pairs = ssim_of_pairs(torch.tensor(np.stack([a, b])), torch.tensor(np.stack([b, a, a])),
                          torch.tensor([[0, 0], [1, 0], [0, 2]]))
    expected = [flat_ssim(0.25, 0.7), 1.0, 1.0]  # in float32: E[x²] − E[x]² cancels
    np.testing.assert_allclose(pairs.numpy(), expected, rtol=1e-3)


def test_ssim_is_symmetric_and_one_only_for_identical_images():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((1, 1, 24, 24)))
    y = (x + 0.1 * torch.from_numpy(rng.standard_normal((1, 1, 24, 24)))).clamp(0, 1)
    torch.testing.assert_close(ssim_torch(x, y), ssim_torch(y, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ssim_torch(x, x), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert ssim_torch(x, y) < 0.99


def test_gaussian_window_is_the_normalised_11_tap_gaussian_of_sigma_1_5():
    kernel = _gaussian_kernel(torch.zeros(1, dtype=torch.float64))
    assert kernel.shape == (11,) and kernel.dtype == torch.float64
    offsets = torch.arange(-5, 6, dtype=torch.float64)
    expected = torch.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    torch.testing.assert_close(kernel, expected / expected.sum(), rtol=1e-12, atol=0)


def test_banded_matrix_is_a_valid_correlation():
    kernel = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    band = _banded(kernel, 5)
    expected = torch.tensor([[1, 0, 0], [2, 1, 0], [3, 2, 1], [0, 3, 2], [0, 0, 3]],
                            dtype=torch.float64)
    assert torch.equal(band, expected)


def test_the_window_by_matmul_equals_the_window_by_convolution():
    images = torch.rand(3, 17, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_conv = _gaussian_window(images[:, None])[:, 0]
    assert by_conv.shape == (3, 7, 13)
    torch.testing.assert_close(_gaussian_window_by_matmul(images), by_conv, rtol=1e-10,
                               atol=1e-12)


def test_ssim_map_has_a_nan_border_of_five_pixels():
    rng = np.random.default_rng(1)
    _, full = ssim_with_map(rng.random((20, 22)), rng.random((20, 22)))
    finite = np.isfinite(full)
    assert finite[5:-5, 5:-5].all()
    assert not finite[:5].any() and not finite[-5:].any()
    assert not finite[:, :5].any() and not finite[:, -5:].any()


def test_unit_tensor_scales_uint8_only():
    assert torch.equal(_unit_tensor(torch.tensor([0, 255], dtype=torch.uint8)),
                       torch.tensor([0.0, 1.0]))
    assert torch.equal(_unit_tensor(np.array([0.5])), torch.tensor([0.5]))


def test_brain_mask_threshold_and_reach():
    image = np.zeros((15, 15))
    image[7, 7] = 0.6 / 255  # above half an 8-bit step: brain
    image[0, 0] = 0.4 / 255  # below: background
    mask = brain_mask(image)
    assert mask.sum() == 25  # a diamond of radius 3 (cross-shaped dilation, three times)
    assert mask[7, 4] and mask[7, 10] and not mask[7, 3] and not mask[4, 4]
    assert not mask[0, 0]
    assert 0.4 / 255 < BACKGROUND_LEVEL < 0.6 / 255


def test_scores_of_an_image_without_brain_are_nan_in_the_brain():
    scores = image_scores(np.zeros((16, 16)), np.full((16, 16), 0.1))
    assert math.isnan(scores["ssim_brain"]) and math.isnan(scores["psnr_brain"])
    assert math.isclose(scores["psnr"], 20.0, rel_tol=1e-12)
    assert math.isclose(scores["mse"], 0.01, rel_tol=1e-12)


def test_brain_scores_of_a_known_error():
    reference = np.zeros((20, 20))
    reference[8:12, 8:12] = 0.8
    image = reference + 0.1  # error 0.1 everywhere: PSNR 20 dB in and out of the brain
    scores = image_scores(reference, image)
    assert math.isclose(scores["psnr_brain"], 20.0, rel_tol=1e-12)
    in_brain = ssim_with_map(reference, image)[1][brain_mask(reference)]
    assert math.isclose(scores["ssim_brain"], float(np.nanmean(in_brain)), rel_tol=1e-12)
    brainless = image_scores(reference, np.where(brain_mask(reference), reference, 0.5))
    assert brainless["psnr_brain"] == float("inf") and brainless["psnr"] < 20


def test_masked_scores_of_a_known_error():
    reference = np.full((24, 24), 0.5)
    mask = np.zeros((24, 24), dtype=bool)
    mask[8:16, 8:16] = True
    scores = masked_scores(reference, reference + 0.1, mask)
    assert math.isclose(scores["psnr"], 20.0, rel_tol=1e-12)
    assert math.isclose(scores["ssim"], float(np.nanmean(
        ssim_with_map(reference, np.where(mask, reference + 0.1, reference))[1][mask])))


@pytest.mark.parametrize("shape", [(2, 1, 12, 12), (2, 12, 12)])
def test_batch_scores_score_each_pair(shape):
    references = torch.zeros(shape, dtype=torch.float64)
    images = references.clone()
    images[1] += 0.1
    rows = batch_scores(references, images)
    assert len(rows) == 2 and rows[0]["psnr"] == float("inf")
    assert math.isclose(rows[1]["psnr"], 20.0, rel_tol=1e-12)
    assert math.isnan(rows[1]["psnr_brain"])  # the brain is the reference's: none here
    means = mean_scores([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": 2.0}])
    assert means == {"a": 2.0, "b": 2.0}  # NaN rows left out of a mean
    assert mean_scores([{"a": 1.5}]) == {"a": 1.5}


def test_codebook_stats_of_a_known_histogram():
    stats = codebook_stats_from_counts(torch.tensor([3, 1, 0, 0]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats["codebook_usage"] == 0.5 and stats["codes_used"] == 2
    assert stats["dead_codes"] == 2
    assert math.isclose(stats["codebook_perplexity"], math.exp(entropy), rel_tol=1e-12)
