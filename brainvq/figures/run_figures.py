"""What `predict.py` draws and writes from a trained run: reconstructions, generated brains,
inpaintings, scores by slice position, surprise maps, and reconstructions as 8-bit PNGs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brainvq.config import InpaintSettings
from brainvq.data.slices import to_uint8, to_unit
from brainvq.evaluation import run_metrics
from brainvq.evaluation.anomaly import LesionStudy
from brainvq.figures.plots import save_grid, save_heatmap_grid, save_line_panels
from brainvq.inference.masks import apply_mask, sites_to_pixels
from brainvq.inference.trained_run import Run


def show_mask(images: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Images with the masked sites' patches dimmed to a flat grey, for display."""
    return np.where(sites_to_pixels(mask, images.shape[-1]), 0.25, images)


def figure_reconstructions(run: Run, images: torch.Tensor, out: Path) -> None:
    indices = run.encode(images)
    recon = run.decode(indices)
    originals = to_unit(images)
    cells = [[o, i.numpy(), r] for o, i, r in zip(originals, indices, recon, strict=True)]
    save_grid(cells, out / "reconstructions.png", ["input", "code indices", "reconstruction"],
              index_cols=[1], n_codes=run.vqvae.cfg.n_codes)


STACK_LEVELS = 8  # generated brains in generated_stack.png, bottom to top


def figure_generated(run: Run, positions: torch.Tensor, temperature: float, seed: int,
                     out: Path, top_p: float = 1.0) -> None:
    """Brains generated from scratch at relative slice `positions` (n,)."""
    start, n = time.time(), len(positions)
    indices = run.generate(positions, temperature, seed, top_p)
    brains = run.decode(indices)
    print(f"generated {n} brains in {time.time() - start:.1f}s")
    per_row = min(n, 4)
    save_grid(_rows(list(indices.numpy()), per_row), out / "generated_indices.png",
              index_cols=range(per_row), n_codes=run.vqvae.cfg.n_codes)
    save_grid(_rows(list(brains), per_row), out / "generated_brains.png")


def figure_generated_stack(run: Run, temperature: float, seed: int, path: Path,
                           levels: int = STACK_LEVELS, top_p: float = 1.0) -> None:
    """One generated brain per relative slice position, from the lowest level (0, cerebellum)
    to the highest (1, vertex), two draws each."""
    positions = torch.linspace(0, 1, levels).repeat(2)
    brains = run.decode(run.generate(positions, temperature, seed, top_p))
    save_grid([list(brains[:levels]), list(brains[levels:])], path,
              col_titles=[f"position {p:.2f}" for p in positions[:levels].tolist()])


BESIDE_REAL_LEVELS = 6  # real slices in generated_vs_real.png, each with two generated brains


def spread_levels(positions: torch.Tensor, n: int = BESIDE_REAL_LEVELS) -> torch.Tensor:
    """Indices of n slices whose relative positions (N,) lie nearest to n levels spread from
    0.1 to 0.9 (NaN: unknown, never chosen); the first n slices if no position is known."""
    known = positions.isfinite()
    if not known.any():
        return torch.arange(min(n, len(positions)))
    distance = (positions[None, :] - torch.linspace(0.1, 0.9, n)[:, None]).abs()
    return distance.masked_fill(~known[None, :], float("inf")).argmin(1)


def figure_generated_beside_real(run: Run, images: torch.Tensor, positions: torch.Tensor,
                                 temperature: float, seed: int, path: Path,
                                 top_p: float = 1.0) -> None:
    """Reconstructions of real slices (N, H, W) in the top row; below each, two brains
    generated at its relative slice position (N,): what a whole-slice test compares."""
    n = len(images)
    generated = run.decode(run.generate(positions.repeat(2), temperature, seed, top_p))
    real = run.decode(run.encode(images))
    save_grid([list(real), list(generated[:n]), list(generated[n:])], path,
              col_titles=[f"position {p:.2f}" for p in positions.tolist()],
              row_titles=["real (reconstructed)", "generated", "generated"])


def figure_inpainting(run: Run, images: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, seed: int, settings: InpaintSettings,
                      path: Path) -> None:
    """Originals, masked, completed from the whole grid's context, and the mean of the raster
    fills; `positions` (N,): the images' relative slice positions (NaN: unknown)."""
    indices = run.encode(images)
    fills = run.inpaint(apply_mask(indices, mask), seed, settings, positions)
    originals = to_unit(images)
    columns = (originals, show_mask(originals, mask), run.decode(fills.full),
               run.decode_mean(fills.candidates))
    save_grid([list(row) for row in zip(*columns, strict=True)], path,
              ["original", "masked", "completed", "mean of fills"])


def figure_inpainting_methods(inpainting: run_metrics.Inpainting, n: int, path: Path) -> None:
    """Originals, masked, raster-only and full-context completions of the first n images, and
    the mean of the raster fills."""
    masked = show_mask(inpainting.originals, inpainting.mask)
    columns = (inpainting.originals, masked, inpainting.raster, inpainting.full, inpainting.mean)
    save_grid([list(row) for row in zip(*columns, strict=True)][:n], path,
              ["original", "masked", "raster", "full context", "mean of fills"])


def figure_scores_by_slice(per_slice: dict[str, dict], path: Path) -> None:
    positions = [int(p) for p in per_slice]
    column = {key: [row[key] for row in per_slice.values()]
              for key in ("ssim", "ssim_brain", "psnr", "psnr_brain")}
    save_line_panels(positions, {
        "SSIM": {"whole slice": column["ssim"], "brain": column["ssim_brain"]},
        "PSNR (dB)": {"whole slice": column["psnr"], "brain": column["psnr_brain"]},
    }, path, "test reconstructions by slice position", "slice index")


def figure_surprise(study: LesionStudy, n: int, path: Path) -> None:
    """Slices without and with a lesion (outlined in both), each beside its per-site surprise."""
    images = [[clean, clean, lesioned, lesioned]
              for clean, lesioned in zip(study.clean[:n], study.lesioned[:n], strict=True)]
    heat = [[None, cb, None, lb]
            for cb, lb in zip(study.clean_bits[:n], study.lesion_bits[:n], strict=True)]
    vmax = float(np.percentile(np.concatenate([study.clean_bits, study.lesion_bits]), 99.5))
    save_heatmap_grid(images, heat, path, ["test slice", "surprise", "with lesion", "surprise"],
                      vmax=vmax, label="−log₂ p(index | earlier) [bits]",
                      outlines=list(study.lesion_pixels[:n]))


def figure_healing(study: LesionStudy, maps: np.ndarray, n: int, path: Path) -> None:
    """Slices with a lesion (outlined), and their anomaly maps by healing."""
    images = [[lesioned, lesioned] for lesioned in study.lesioned[:n]]
    heat = [[None, m] for m in maps[:n]]
    save_heatmap_grid(images, heat, path, ["with lesion", "brighter than every healing"],
                      vmax=float(np.percentile(maps, 99.9)) or 1.0,
                      label="anomaly (intensity)", outlines=list(study.lesion_pixels[:n]))


def _rows(items: list[np.ndarray], per_row: int) -> list[list[np.ndarray]]:
    """Split into rows of `per_row`, padding the last row with blank cells."""
    items = items + [np.zeros_like(items[0])] * (-len(items) % per_row)
    return [items[i:i + per_row] for i in range(0, len(items), per_row)]


def write_reconstructions(names: list[str], reconstructions: np.ndarray, folder: Path) -> None:
    """Each reconstruction as an 8-bit grayscale PNG named as its input (.png suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, to_uint8(reconstructions), strict=True):
        Image.fromarray(image).save(folder / Path(name).with_suffix(".png").name)
    print(f"{len(names)} reconstructions in {folder}")
