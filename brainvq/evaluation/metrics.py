"""Image and codebook metrics. SSIM/PSNR come from scikit-image (Wang et al. 2004 settings)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation
from skimage.metrics import structural_similarity

from modules import at_least_fp32

SSIM_WINDOW = 11  # what σ = 1.5 with scikit-image's truncation at 3.5 σ gives
BRAIN_DILATION_PX = 3  # grow the brain mask a little so its edge counts too
BACKGROUND_LEVEL = 0.5 / 255  # below half an 8-bit step is background (float round trips)
SSIM_SETTINGS = {"data_range": 1.0, "gaussian_weights": True, "sigma": 1.5,
                 "use_sample_covariance": False}


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Mean SSIM of two (H, W) images in [0, 1] of the same dtype, as `ssim_with_map`."""
    return float(structural_similarity(reference, image, **SSIM_SETTINGS))


def ssim_with_map(reference: np.ndarray, image: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean SSIM and per-pixel SSIM of two (H, W) images in [0, 1]: 11×11 Gaussian window,
    σ = 1.5. The map's 5-pixel border, where the window leaves the image, is set to NaN, as
    scikit-image leaves it out of the mean."""
    mean, full = structural_similarity(reference, image, full=True, **SSIM_SETTINGS)
    border = SSIM_WINDOW // 2
    inner = np.full_like(full, np.nan)
    inner[border:-border, border:-border] = full[border:-border, border:-border]
    return float(mean), inner


def ssim_torch(reference: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of (B, 1, H, W) images in [0, 1], differentiable: the metric above (same
    window and constants, border left out) as a training loss term. At least fp32: under bf16
    autocast the variances E[x²] − E[x]² would lose almost every significant digit."""
    with torch.autocast(device_type=image.device.type, enabled=False):
        return _ssim_map_fp32(at_least_fp32(reference), at_least_fp32(image)).mean()


def ssim_psnr_per_image(reference: torch.Tensor,
                        image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) SSIM and (B,) PSNR of (B, 1, H, W) pairs in [0, 1], on their own device: the
    whole-slice metrics of `image_scores` in fp32, so that validation during training need not
    copy every slice to the CPU. PSNR is inf where a pair is identical."""
    with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=False):
        x, y = at_least_fp32(reference), at_least_fp32(image)
        ssim_values = _ssim_map_fp32(x, y).mean(dim=(-2, -1))
        mse = (x - y).square().mean(dim=(1, 2, 3))
        return ssim_values, 10 * torch.log10(1 / mse)


def _ssim_map_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) pairs → (B, H − 10, W − 10) per-pixel SSIM where the window fits."""
    moments = _gaussian_window(torch.cat([x, y, x * x, y * y, x * y], dim=1))  # (B, 5, h, w)
    return _ssim_map(*moments.unbind(1))


def ssim_of_pairs(a: torch.Tensor, b: torch.Tensor, pairs: torch.Tensor,
                  chunk: int = 128) -> torch.Tensor:
    """(P,) mean SSIM of a[i] and b[j] for each row (i, j) of `pairs` (P, 2); a (N, H, W) and
    b (M, H, W) are uint8 or in [0, 1]. The metric of `ssim`, in fp32 and batched: each image's
    local moments are filtered once, only the cross moment once per pair."""
    used_a, pair_a = pairs[:, 0].unique(return_inverse=True)
    used_b, pair_b = pairs[:, 1].unique(return_inverse=True)
    a, b = _unit_tensor(a[used_a]), _unit_tensor(b[used_b])
    own_a, own_b = _own_moments(a), _own_moments(b)
    scores = []
    for i, j in zip(pair_a.split(chunk), pair_b.split(chunk), strict=True):
        means = own_a[i, 0] * own_b[j, 0]  # μx μy
        covariance = _gaussian_window_by_matmul(a[i] * b[j]) - means
        scores.append(_ssim_from_moments(means, own_a[i, 1] + own_b[j, 1],
                                         own_a[i, 2] + own_b[j, 2], covariance)
                      .mean(dim=(-2, -1)))
    return torch.cat(scores)


def _own_moments(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) → (N, 3, h, w): each image's windowed mean μ, μ² and variance."""
    mean, square = _gaussian_window_by_matmul(torch.stack([images, images * images], dim=1)
                                              ).unbind(1)
    return torch.stack([mean, mean * mean, square - mean * mean], dim=1)


def _unit_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images)
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _gaussian_window(moments: torch.Tensor) -> torch.Tensor:
    """Each channel of (B, C, H, W) averaged over SSIM's Gaussian window, where the window
    fits: (B, C, H − 10, W − 10)."""
    channels = moments.shape[1]
    gauss = _gaussian_kernel(moments).repeat(channels, 1, 1, 1)  # (C, 1, 1, k): one per channel
    # The Gaussian window is separable: a row pass then a column pass, no padding.
    moments = F.conv2d(moments, gauss, groups=channels)
    return F.conv2d(moments, gauss.transpose(2, 3), groups=channels)


def _gaussian_window_by_matmul(images: torch.Tensor) -> torch.Tensor:
    """`_gaussian_window` of (..., H, W) as two banded matrix products: on the CPU ~3× faster
    than a one-channel convolution, for scoring many pairs (the training loss keeps the
    convolution, so that runs keep their numbers)."""
    kernel = _gaussian_kernel(images)
    rows, columns = _banded(kernel, images.shape[-2]), _banded(kernel, images.shape[-1])
    return rows.T @ images @ columns


def _gaussian_kernel(like: torch.Tensor) -> torch.Tensor:
    """(k,) SSIM's normalised Gaussian window, in `like`'s dtype and device."""
    radius = SSIM_WINDOW // 2
    offsets = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    gauss = torch.exp(-offsets ** 2 / (2 * SSIM_SETTINGS["sigma"] ** 2))
    return gauss / gauss.sum()


def _banded(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size − k + 1): column j holds `kernel` at rows j … j + k − 1 (a valid 1-D
    correlation as a matrix)."""
    k = len(kernel)
    band = torch.zeros(size, size - k + 1, dtype=kernel.dtype, device=kernel.device)
    for offset, weight in enumerate(kernel):
        band.diagonal(-offset)[:] = weight
    return band


def _ssim_map(mean_x: torch.Tensor, mean_y: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor,
              xy: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM from windowed means and second moments."""
    var_x, var_y, cov = xx - mean_x ** 2, yy - mean_y ** 2, xy - mean_x * mean_y
    return _ssim_from_moments(mean_x * mean_y, mean_x ** 2 + mean_y ** 2, var_x + var_y, cov)


def _ssim_from_moments(mean_product: torch.Tensor, mean_squares: torch.Tensor,
                       variances: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """SSIM from μx μy, μx² + μy², σx² + σy² and σxy (any shape alike)."""
    c1, c2 = (0.01 * SSIM_SETTINGS["data_range"]) ** 2, (0.03 * SSIM_SETTINGS["data_range"]) ** 2
    return ((2 * mean_product + c1) * (2 * covariance + c2)
            / ((mean_squares + c1) * (variances + c2)))


def psnr(reference: np.ndarray, image: np.ndarray, mask: np.ndarray | None = None) -> float:
    mse = float(np.mean((reference - image)[mask] ** 2 if mask is not None
                        else (reference - image) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def brain_mask(reference: np.ndarray) -> np.ndarray:
    """Pixels inside the brain: original > 0, dilated by a few pixels."""
    return binary_dilation(reference > BACKGROUND_LEVEL, iterations=BRAIN_DILATION_PX)


def image_scores(reference: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """Whole-slice and in-brain SSIM, PSNR and MSE for one (H, W) pair in [0, 1]."""
    ref, img = reference.astype(np.float64), image.astype(np.float64)
    ssim, smap = ssim_with_map(ref, img)
    mask = brain_mask(ref)
    has_brain = bool(mask.any())
    return {
        "ssim": ssim,
        "psnr": psnr(ref, img),
        "mse": float(np.mean((ref - img) ** 2)),
        "ssim_brain": float(np.nanmean(smap[mask])) if has_brain else float("nan"),
        "psnr_brain": psnr(ref, img, mask) if has_brain else float("nan"),
    }


def masked_scores(reference: np.ndarray, image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """SSIM and PSNR of `image` on the pixels where the (H, W) bool `mask` is set, e.g. an
    inpainted region. Outside the mask the image is replaced by the reference first: only the
    filled-in pixels are judged, and SSIM windows at the mask's rim see the true context."""
    ref = reference.astype(np.float64)
    img = np.where(mask, image.astype(np.float64), ref)
    _, smap = ssim_with_map(ref, img)
    return {"ssim": float(np.nanmean(smap[mask])), "psnr": psnr(ref, img, mask)}


def batch_scores(references: torch.Tensor, images: torch.Tensor) -> list[dict[str, float]]:
    """Scores for each pair of (B, 1, H, W) or (B, H, W) tensors in [0, 1]."""
    refs = references.reshape(-1, *references.shape[-2:]).cpu().numpy()
    imgs = images.reshape(-1, *images.shape[-2:]).cpu().numpy()
    return [image_scores(r, i) for r, i in zip(refs, imgs, strict=True)]


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}


def codebook_stats(indices: torch.Tensor, n_codes: int) -> dict[str, float]:
    """Usage (fraction of codes used), perplexity and dead codes of a set of index grids."""
    return codebook_stats_from_counts(torch.bincount(indices.flatten().long(), minlength=n_codes))


def codebook_stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """The same from a histogram of code counts (K,)."""
    counts = counts.double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"codebook_usage": used / len(counts), "codebook_perplexity": math.exp(entropy),
            "codes_used": used, "dead_codes": len(counts) - used}
