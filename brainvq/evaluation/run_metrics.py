"""What `predict.py --evaluate` measures on a trained run: reconstructions (overall and per
slice position), generated samples (memorisation and diversity), and inpainting with the raster
and the full-context sampler. Sample realism is in generation.py, lesions in anomaly.py."""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from brainvq.checkpoints import load_indices
from brainvq.config import InpaintSettings
from brainvq.data.slices import (
    SliceSet,
    evenly_spaced,
    relative_positions,
    slice_index,
    to_uint8,
    to_unit,
)
from brainvq.evaluation.metrics import (
    batch_scores,
    brain_mask,
    codebook_stats,
    masked_scores,
    mean_scores,
    ssim_of_pairs,
)
from brainvq.inference.masks import apply_mask, given_after_holes, site_coverage, sites_to_pixels
from brainvq.inference.trained_run import Run, evaluate_prior

MEMORISED_SSIM = 0.98  # samples this close to training images on average are taken for copies
NN_SIDE = 64  # images are compared by L2 at this size to shortlist nearest neighbours ...
NN_CANDIDATES = 16  # ... and this many per query are then scored by SSIM


# ---------------------------------------------------------------------------- helpers
# ------------------------------------------------------------------- reconstructions
def reconstruction_metrics(run: Run, test: SliceSet, indices: torch.Tensor,
                           reconstructions: np.ndarray) -> dict:
    """Test-split scores of the VQ-VAE and the prior, and the scores per slice position."""
    references = to_unit(test.images)
    rows = batch_scores(torch.from_numpy(references), torch.from_numpy(reconstructions))
    metrics: dict = {f"test_{k}": v for k, v in mean_scores(rows).items()}
    metrics.update(codebook_stats(indices, run.vqvae.cfg.n_codes))
    metrics.update(brain_codebook_stats(references, indices, run.vqvae.cfg.n_codes))
    positions = relative_positions(test.names)
    metrics["prior_test_bits_per_index"] = evaluate_prior(run.prior, indices, run.device, 32,
                                                          positions)
    brain = torch.from_numpy(mostly_brain_sites(references, indices.shape[-1]))
    metrics["prior_test_bits_brain"] = run.surprise(indices, positions)[brain].mean().item()
    metrics["n_test_images"] = len(test)
    by_position = per_slice_position(test.names, rows)
    if by_position:
        metrics["per_slice_position"] = by_position
    return metrics


def brain_codebook_stats(images: np.ndarray, indices: torch.Tensor, n_codes: int) -> dict:
    """Codes used and perplexity at the sites that are mostly brain. Background sites are
    most of a grid and share a handful of codes, so the whole grid's perplexity says little
    about how much of the codebook's log2(K) bits per site the brain gets."""
    sites = mostly_brain_sites(images, indices.shape[-1])
    stats = codebook_stats(indices[torch.from_numpy(sites)], n_codes)
    return {"codes_used_brain": stats["codes_used"],
            "codebook_perplexity_brain": stats["codebook_perplexity"]}


def per_slice_position(names: list[str], rows: list[dict[str, float]]) -> dict[str, dict]:
    """Mean scores of the images at each slice index (from `case_X_slice_Y` names), keyed by
    the index as a string and in its order; empty if no name carries a slice index."""
    groups: dict[int, list[dict[str, float]]] = defaultdict(list)
    for name, row in zip(names, rows, strict=True):
        position = slice_index(name)
        if position is not None:
            groups[position].append(row)
    return {str(p): {**mean_scores(groups[p]), "n_images": len(groups[p])}
            for p in sorted(groups)}


# --------------------------------------------------------------------------- samples
def sample_metrics(run: Run, samples: np.ndarray, test_reconstructions: np.ndarray) -> dict:
    """How close generated brains (uint8 (n, H, W)) are to their nearest training image and to
    each other.

    Samples are compared with the VQ-VAE's reconstructions of the training images (decoded
    from the run's indices.pt), not the raw images: a copied training grid then scores SSIM 1,
    whereas against raw images reconstruction error alone would keep every sample below the
    memorisation threshold. `test_nn_ssim` scores test-image reconstructions the same way: what
    a new brain from the training distribution gets.
    """
    n = len(samples)
    references = training_reconstructions(run)
    test = to_uint8(test_reconstructions[evenly_spaced(len(test_reconstructions), n).numpy()])
    nn_ssim = float(nearest_neighbour_ssim(samples, references)[0].mean())
    metrics = {
        "sample_nn_ssim": nn_ssim,
        "test_nn_ssim": float(nearest_neighbour_ssim(test, references)[0].mean()),
        "sample_diversity": 1 - mean_pairwise_ssim(samples),
        "samples_memorised": nn_ssim >= MEMORISED_SSIM,
        "n_eval_samples": n,
    }
    if metrics["samples_memorised"]:
        print(f"warning: generated brains have a mean SSIM of {nn_ssim:.3f} to their nearest "
              f"training image (≥ {MEMORISED_SSIM}): the prior may be reproducing training "
              "slices", file=sys.stderr)
    return metrics


def training_reconstructions(run: Run) -> np.ndarray:
    """uint8 (N, H, W) decodings of the training split's index grids, the prior's data."""
    grids = load_indices(run.path)["train"].long()
    return np.concatenate([to_uint8(run.decode(chunk)) for chunk in grids.split(256)])


def nearest_neighbour_ssim(queries: np.ndarray, references: np.ndarray,
                           n_candidates: int = NN_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """For each uint8 query (Q, H, W), the highest SSIM to any uint8 reference (N, H, W), and
    that reference's index. Candidates are shortlisted by L2 distance at NN_SIDE² pixels."""
    shortlist = torch.cdist(_thumbnails(queries), _thumbnails(references)).topk(
        min(n_candidates, len(references)), dim=1, largest=False).indices
    n, k = shortlist.shape
    pairs = torch.stack([torch.arange(n).repeat_interleave(k), shortlist.flatten()], dim=1)
    scores = ssim_of_pairs(torch.from_numpy(queries), torch.from_numpy(references), pairs)
    best, pick = scores.view(n, k).max(dim=1)
    return best.double().numpy(), shortlist.gather(1, pick[:, None]).squeeze(1).numpy()


def mean_pairwise_ssim(images: np.ndarray) -> float:
    """Mean SSIM over every pair of uint8 images (N, H, W)."""
    pairs = torch.combinations(torch.arange(len(images)), 2)
    images = torch.from_numpy(images)
    return ssim_of_pairs(images, images, pairs).double().mean().item()


def _thumbnails(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) → (N, NN_SIDE²) block means in [0, 1]."""
    return torch.cat([F.adaptive_avg_pool2d(torch.from_numpy(chunk).float()[:, None] / 255,
                                            NN_SIDE).flatten(1)
                      for chunk in np.array_split(images, max(1, len(images) // 512))])


# ------------------------------------------------------------------------ inpainting
@dataclass
class Inpainting:
    """Decoded completions of one mask, images in [0, 1]: raster-only, full-context, and the
    mean of the raster fills."""
    originals: np.ndarray
    mask: torch.Tensor
    raster: np.ndarray
    full: np.ndarray
    mean: np.ndarray


FILL_METHODS = ("raster", "likeliest_above", "full")  # fills that are code grids
INPAINT_METHODS = ("reconstruction", *FILL_METHODS, "mean")


def inpainting_metrics(run: Run, images: torch.Tensor, masks: dict[str, torch.Tensor],
                       seed: int, settings: InpaintSettings,
                       positions: torch.Tensor | None = None
                       ) -> tuple[dict, dict[str, Inpainting]]:
    """SSIM and PSNR inside each mask's region of uint8 `images` completed by the prior
    (`inference.Fills`: one raster sample, the likeliest of the candidates given the context
    above the hole, given the whole grid, and the pixel-wise mean of the decoded raster
    candidates) and of the plain reconstruction (what a perfect prior could reach). Where given
    sites follow the hole, also their mean surprise (bits) given each fill that is a code grid:
    how well it agrees with the context that raster order cannot see. `positions` (N,): the
    slices' relative positions, for a prior conditioned on them."""
    originals = to_unit(images)
    indices = run.encode(images)
    metrics: dict = {"inpaint_n_images": len(images),
                     **{f"inpaint_{k}": v for k, v in asdict(settings).items()}}
    reconstructions = run.decode(indices)
    completions = {}
    for name, mask in masks.items():
        masked = apply_mask(indices, mask)
        fills = run.inpaint(masked, seed, settings, positions)
        grids = {"reconstruction": indices, **{m: getattr(fills, m) for m in FILL_METHODS}}
        pixels = sites_to_pixels(mask, images.shape[-1])
        context = given_after_holes(masked == -1)
        decoded, scored = {}, {}  # by id: with no context after the hole, fills are one tensor
        for method, filled in grids.items():
            key = id(filled)
            if key not in decoded:
                decoded[key] = reconstructions if method == "reconstruction" \
                    else run.decode(filled)
                scored[key] = _hole_scores(originals, decoded[key], pixels)
                if context.any():
                    scored[key]["context_bits"] = \
                        run.surprise(filled, positions)[context].mean().item()
            metrics.update(_named(name, method, scored[key]))
        mean = run.decode_mean(fills.candidates)
        metrics.update(_named(name, "mean", _hole_scores(originals, mean, pixels)))
        completions[name] = Inpainting(originals, mask, decoded[id(fills.raster)],
                                       decoded[id(fills.full)], mean)
    return metrics, completions


def _hole_scores(originals: np.ndarray, completed: np.ndarray,
                 pixels: np.ndarray) -> dict[str, float]:
    """Mean SSIM and PSNR of the `completed` images on the hole's `pixels`."""
    return mean_scores([masked_scores(o, c, pixels)
                        for o, c in zip(originals, completed, strict=True)])


def _named(mask: str, method: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"inpaint_{mask}_{method}_{score}": value for score, value in scores.items()}


def mostly_brain_sites(images: np.ndarray, grid: int) -> np.ndarray:
    """(N, H, W) or (N, 1, H, W) images → (N, grid, grid) bool: sites whose patch is at
    least half brain."""
    images = images.reshape(-1, *images.shape[-2:])
    return site_coverage(np.stack([brain_mask(image) for image in images]), grid) >= 0.5


# ------------------------------------------------------------------------------- summary
def summary(metrics: dict[str, Any], path: Path) -> list[str]:
    """The few numbers a reader looks for, grouped as they are read (about 15 lines), each
    realism score beside its sanity values; ends by saying where all of them are."""
    m = defaultdict(lambda: float("nan"), metrics)
    lines = []
    if "test_ssim" in metrics:
        lines += [
            f"Reconstruction ({m['n_test_images']} test slices): SSIM {m['test_ssim']:.3f} "
            f"(brain {m['test_ssim_brain']:.3f}), PSNR {m['test_psnr']:.2f} dB "
            f"(brain {m['test_psnr_brain']:.2f})",
            f"Codebook: {m['codes_used']} codes used, perplexity {m['codebook_perplexity']:.1f} "
            f"(brain {m['codebook_perplexity_brain']:.1f})"]
    if "prior_test_bits_per_index" in metrics:
        lines.append(f"Prior: {m['prior_test_bits_per_index']:.3f} bits per index "
                     f"(brain {m['prior_test_bits_brain']:.3f})")
    if "c2st_accuracy" in metrics:
        lines += [
            f"Generated brains ({m['n_eval_samples']}) against real test slices "
            "[sanity cases]; 0.5: indistinguishable",
            f"  two-sample test {m['c2st_accuracy']:.3f} [real vs real "
            f"{m['c2st_real_vs_real']:.3f} ± {m['c2st_real_vs_real_sd']:.3f}; "
            f"unigram {m['c2st_unigram']:.3f}, chimeras {m['c2st_chimera']:.3f}]",
            f"  Fréchet distance {m['sample_fd']:.3f} [real vs real "
            f"{m['sample_fd_real_vs_real']:.3f} ± {m['sample_fd_real_vs_real_sd']:.3f}; "
            f"unigram {m['sample_fd_unigram']:.3f}]",
            f"  whole-slice test, 128 px {m['slice_c2st']:.3f} [real vs real "
            f"{m['slice_c2st_real_vs_real']:.3f} ± {m['slice_c2st_real_vs_real_sd']:.3f}; "
            f"unigram {m['slice_c2st_unigram']:.3f}, chimeras {m['slice_c2st_chimera']:.3f}]",
            f"  level error {m['sample_position_mae']:.3f} [real {m['test_position_mae']:.3f}]; "
            f"nearest training SSIM {m['sample_nn_ssim']:.3f} [real {m['test_nn_ssim']:.3f}]"]
    masks = [name for name in ("bottom_half", "centre_square")
             if f"inpaint_{name}_raster_ssim" in metrics]
    if masks:
        lines.append(f"Inpainting, SSIM in the hole of {m['inpaint_n_images']} test slices: "
                     "raster / full context / mean / true codes")
        lines += [f"  {name.replace('_', ' ')}: " + " / ".join(
            f"{m[f'inpaint_{name}_{method}_ssim']:.3f}"
            for method in ("raster", "full", "mean", "reconstruction")) for name in masks]
    if "lesion_auprc" in metrics:
        lines.append(f"Synthetic lesions: AUPRC {m['lesion_auprc']:.3f} (random map "
                     f"{m['lesion_auprc_random_map']:.3f}, true difference "
                     f"{m['lesion_auprc_true_difference']:.3f}), Dice {m['lesion_dice']:.3f}")
    return [*lines, f"All {len(metrics)} numbers: {path}"]
