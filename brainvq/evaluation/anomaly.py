"""The prior as an anomaly detector, on synthetic lesions pasted into test slices: its surprise
−log₂ p(index | earlier indices) at the lesion, and pixel anomaly maps by healing (Pinaya et al.
2022): the sites the prior finds too surprising are resampled from it, the grids are decoded,
and what the input shows beyond every healed version marks what the prior would not have drawn
there. The lesions are bright (hyperintense, as lesions in FLAIR), so the maps keep only the
input's excess brightness, as anomaly benchmarks on FLAIR do with the residual."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt, median_filter, uniform_filter

from brainvq.data.slices import to_unit
from brainvq.evaluation.metrics import brain_mask
from brainvq.evaluation.run_metrics import mostly_brain_sites
from brainvq.inference.masks import pixels_to_sites, site_coverage, sites_to_pixels
from brainvq.inference.trained_run import Run

LESION_RADIUS_PX = 8
LESION_EDGE_PX = 1.5  # width of the lesion's soft edge
LESION_CONTRAST = 0.7  # lesions go where the tissue around is at most this × their peak
HEAL_QUANTILES = (0.6, 0.7, 0.8, 0.9)  # candidate site thresholds, of clean smoothed surprise
# A lesion raises the surprise of a cluster of neighbouring sites; a normal site's high surprise
# is mostly alone. Sites are resampled by their surprise averaged over this window of sites.
SURPRISE_WINDOW = 3
HEALINGS = 16  # healed versions of each slice: one draw of the resampled sites is noisy
MAP_MEDIAN_PX = 7  # the maps' median filter: isolated bright pixels are not lesions


@dataclass
class LesionStudy:
    """Test slices without and with a synthetic lesion, images in [0, 1], and the prior's
    surprise −log₂ p(index | earlier indices) at every site (n, grid, grid) for both."""
    clean: np.ndarray
    lesioned: np.ndarray
    clean_bits: np.ndarray
    lesion_bits: np.ndarray
    lesion_pixels: np.ndarray  # (n, H, W) bool: within the lesion's radius
    lesion_sites: np.ndarray  # (n, grid, grid) bool: sites whose patch the lesion touches
    brain_sites: np.ndarray  # (n, grid, grid) bool: the other sites, mostly inside the brain
    brain_pixels: np.ndarray  # (n, H, W) bool: the clean slices' brain masks
    lesion_indices: torch.Tensor  # (n, grid, grid) code grids of the lesioned slices
    positions: torch.Tensor | None  # (n,) relative slice positions, if known


def paste_lesion(image: np.ndarray, rng: np.random.Generator,
                 radius: float = LESION_RADIUS_PX) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc with a soft edge, at the slice's brightest value, blended into a uint8
    (H, W) slice at a random point at least 2·radius inside the brain (where the brain allows)
    whose surroundings are darker than the disc, so that it shows. Returns the new slice and
    the (H, W) mask of the pixels within `radius` of the disc's centre."""
    peak = float(image.max())
    depth = distance_transform_edt(image > 0)
    inside = depth >= min(2 * radius, depth.max())
    surroundings = uniform_filter(image.astype(np.float64), size=int(2 * radius + 1))
    darker = inside & (surroundings <= LESION_CONTRAST * peak)
    cy, cx = rng.choice(np.argwhere(darker if darker.any() else inside))
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    weight = 1 / (1 + np.exp((distance - radius) / LESION_EDGE_PX))
    lesioned = image * (1 - weight) + peak * weight
    return lesioned.round().astype(np.uint8), distance <= radius


def lesion_study(run: Run, images: torch.Tensor, seed: int,
                 positions: torch.Tensor | None = None) -> LesionStudy:
    """Paste a lesion into each uint8 slice (N, H, W) that shows brain, and score both
    versions of those slices with the prior (at their relative `positions`, if known)."""
    shows_brain = images.flatten(1).amax(1) > 0
    images = images[shows_brain]
    positions = None if positions is None else positions[shows_brain]
    rng = np.random.default_rng(seed)
    lesioned, lesion_pixels = zip(*(paste_lesion(image, rng) for image in images.numpy()),
                                  strict=True)
    lesioned_images = torch.from_numpy(np.stack(lesioned))
    clean_indices, lesion_indices = run.encode(images), run.encode(lesioned_images)
    grid = clean_indices.shape[-1]
    clean = to_unit(images)
    lesion_sites = np.stack([pixels_to_sites(m, grid) for m in lesion_pixels])
    brain_sites = mostly_brain_sites(clean, grid)
    return LesionStudy(
        clean=clean, lesioned=to_unit(lesioned_images),
        clean_bits=run.surprise(clean_indices, positions).numpy(),
        lesion_bits=run.surprise(lesion_indices, positions).numpy(),
        lesion_pixels=np.stack(lesion_pixels), lesion_sites=lesion_sites,
        brain_sites=brain_sites & ~lesion_sites,
        brain_pixels=np.stack([brain_mask(image) for image in clean]),
        lesion_indices=lesion_indices,
        positions=positions)


def surprise_metrics(study: LesionStudy) -> dict[str, float]:
    """Mean surprise (bits) at the lesion's sites (any pixel of their patch within the lesion's
    radius; and the core: at least half of it), at the lesion's pixels (each scored by its
    site), at the same sites or pixels without the lesion, and at the rest of the brain
    (lesioned slices)."""
    coverage = site_coverage(study.lesion_pixels, study.lesion_sites.shape[-1])
    core = coverage >= 0.5
    return {
        "surprise_lesion_bits": float(study.lesion_bits[study.lesion_sites].mean()),
        "surprise_lesion_sites_clean_bits": float(study.clean_bits[study.lesion_sites].mean()),
        "surprise_lesion_core_bits": float(study.lesion_bits[core].mean()),
        "surprise_lesion_core_clean_bits": float(study.clean_bits[core].mean()),
        "surprise_lesion_pixels_bits": _weighted_mean(study.lesion_bits, coverage),
        "surprise_lesion_pixels_clean_bits": _weighted_mean(study.clean_bits, coverage),
        "surprise_brain_bits": float(study.lesion_bits[study.brain_sites].mean()),
        "surprise_n_images": len(study.clean),
    }


def _weighted_mean(bits: np.ndarray, coverage: np.ndarray) -> float:
    """Mean of site `bits` weighted by each site's lesion `coverage`: the mean over the lesion's
    pixels of their sites' bits. A site the lesion's rim barely touches counts for the few
    pixels it holds, not as much as one the lesion fills."""
    return float((bits * coverage).sum() / coverage.sum())


# ---------------------------------------------------------------------- healing
def smoothed_surprise(bits: np.ndarray) -> np.ndarray:
    """(n, grid, grid) surprise averaged over SURPRISE_WINDOW² sites (zero beyond the grid)."""
    return uniform_filter(bits, size=(1, SURPRISE_WINDOW, SURPRISE_WINDOW), mode="constant")


def healed_maps(run: Run, study: LesionStudy, threshold: float, seed: int) -> np.ndarray:
    """(n, H, W) anomaly maps: how much brighter each lesioned slice is than the brightest of
    HEALINGS healed versions, in which every site whose smoothed surprise exceeds `threshold`
    bits is resampled by the prior; zero outside those sites and the brain, median-filtered."""
    resampled = smoothed_surprise(study.lesion_bits) > threshold
    masked = study.lesion_indices.clone()
    masked[torch.from_numpy(resampled)] = -1
    positions = None if study.positions is None \
        else study.positions.repeat_interleave(HEALINGS)
    healed = run.decode(run.sample(masked.repeat_interleave(HEALINGS, 0), 1.0, seed, positions))
    healed = healed.reshape(len(masked), HEALINGS, *healed.shape[1:])  # (n, HEALINGS, H, W)
    size = study.lesioned.shape[-1]
    where = study.brain_pixels & np.stack([sites_to_pixels(torch.from_numpy(r), size)
                                           for r in resampled])
    brighter = np.clip(study.lesioned - healed.max(axis=1), 0, None) * where
    return median_filter(brighter, size=(1, MAP_MEDIAN_PX, MAP_MEDIAN_PX))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision) of pixel `scores` against
    bool `labels`; tied scores are ranked in their given order."""
    order = np.argsort(-scores.ravel(), kind="stable")
    hits = labels.ravel()[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def dice(predicted: np.ndarray, labels: np.ndarray) -> float:
    overlap = np.logical_and(predicted, labels).sum()
    return float(2 * overlap / max(1, predicted.sum() + labels.sum()))


def best_dice_level(maps: np.ndarray, labels: np.ndarray) -> float:
    """The map level, among quantiles of the maps' non-zero values, with the best Dice."""
    values = maps[maps > 0]
    if not len(values):
        return float("inf")
    levels = np.quantile(values, np.linspace(0.5, 0.999, 40))
    return float(max(levels, key=lambda level: dice(maps > level, labels)))


def choose_healing(run: Run, validation: LesionStudy, seed: int) -> tuple[float, float]:
    """Site threshold (bits) and pixel level chosen on lesioned validation slices: the
    threshold among quantiles of the clean slices' in-brain smoothed surprise whose maps give
    the best average precision, and the level with the best Dice on those maps."""
    clean = smoothed_surprise(validation.clean_bits)[validation.brain_sites]
    best = (-1.0, float("inf"), float("inf"))
    for threshold in np.quantile(clean, HEAL_QUANTILES):
        maps = healed_maps(run, validation, float(threshold), seed)
        precision = average_precision(maps, validation.lesion_pixels)
        print(f"healing, validation: threshold {threshold:.2f} bits, average precision "
              f"{precision:.3f}", flush=True)  # each threshold heals every slice 16 times
        if precision > best[0]:
            best = (precision, float(threshold), best_dice_level(maps, validation.lesion_pixels))
    return best[1], best[2]


def healing_metrics(run: Run, test: LesionStudy, validation: LesionStudy,
                    seed: int) -> tuple[dict[str, float], np.ndarray]:
    """Pixel-level detection of the test lesions by healing, with its settings chosen on
    validation, beside a map that must score badly (random) and one that must score well
    (|lesioned − clean|, the lesion itself); and the test anomaly maps."""
    threshold, level = choose_healing(run, validation, seed)
    maps = healed_maps(run, test, threshold, seed)
    labels = test.lesion_pixels
    random = np.random.default_rng(seed).random(maps.shape)
    return {
        "lesion_auprc": average_precision(maps, labels),
        "lesion_dice": dice(maps > level, labels),
        "lesion_auprc_random_map": average_precision(random, labels),
        "lesion_auprc_true_difference": average_precision(
            np.abs(test.lesioned - test.clean), labels),
        "heal_threshold_bits": threshold,
        "heal_pixel_level": level,
    }, maps
