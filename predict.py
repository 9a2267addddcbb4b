"""Use a trained run: reconstruct test slices, generate new brains with the PixelCNN prior,
inpaint masked regions, and (with --evaluate) write metrics.json.

    python predict.py                      # figures for runs/demo
    python predict.py --run runs/oasis --evaluate --mask my_mask.png
    python predict.py --surprise           # the prior's surprise at a synthetic lesion
    python predict.py --reconstruct-dir recon/   # every test reconstruction as 8-bit PNG
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dataset
import evaluation
from evaluation import (
    apply_mask,
    evenly_spaced,
    given_after_holes,
    pixels_to_sites,
    sites_to_pixels,
    to_uint8,
)
from io_utils import RunError, write_json
from modules import PixelCNN
from plots import save_grid, save_heatmap_grid, save_line_panels
from train import encode_images, load_prior, load_vqvae, pick_device, stage_checkpoint

# ---- Edit these, or override them with command-line flags --------------------------------
RUN_DIR = "runs/demo"
DATA_ROOT: str | None = None  # None: the data the run was trained on
N_SHOW = 6  # test images in the reconstruction and inpainting figures
N_SAMPLES = 8  # brains generated from scratch
TEMPERATURE = 1.0
SEED = 0
N_EVAL_SAMPLES = 64  # generated brains scored for memorisation and diversity (--evaluate)
N_INPAINT = 8  # test images inpainted for the inpainting metrics (--evaluate)
GIBBS_SWEEPS = 1  # full-context inpainting: Gibbs sweeps over the masked sites ...
GIBBS_PROPOSALS = 2  # ... each site choosing among this many drawn codes and its own
N_SURPRISE = 16  # test images that get a synthetic lesion (--surprise)
SAMPLER = "fast"  # "fast": cached, each site computed once; "naive": a forward pass per site
# --------------------------------------------------------------------------------------------


class Run:
    """The trained models of a run folder, rebuilt from their checkpoints alone."""

    def __init__(self, run: Path, device: torch.device, sampler: str = SAMPLER) -> None:
        self.path, self.device, self.sampler = run, device, sampler
        self.vqvae, self.norm, state = load_vqvae(stage_checkpoint(run, "vqvae", "best"), device)
        self.data_root = Path(state["data_root"])
        self.spacing = state.get("spacing", dataset.VOLUME_SPACING_MM)  # of volume data
        self.prior = load_prior(stage_checkpoint(run, "prior", "best"), device)
        if self.prior.cfg.n_codes != self.vqvae.cfg.n_codes:
            raise RunError(f"prior of {run} has {self.prior.cfg.n_codes} codes but its VQ-VAE "
                           f"{self.vqvae.cfg.n_codes}: retrain the prior (--stage prior)")

    def to_unit(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, H, W) → float (B, H, W) in [0, 1]."""
        return (images.float() / 255).numpy()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vqvae, images, self.norm, self.device).long()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> np.ndarray:
        """(B, 32, 32) indices → (B, 256, 256) images in [0, 1]."""
        images = [self.vqvae.indices_to_image(b.to(self.device)).float().cpu()
                  for b in indices.split(32)]
        return self.norm.denormalise(torch.cat(images))[:, 0].numpy()

    def sample(self, indices: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.prior.sample(indices.to(self.device), temperature, generator,
                                 method=self.sampler).cpu()

    def inpaint(self, indices: torch.Tensor, temperature: float, seed: int, sweeps: int,
                proposals: int) -> torch.Tensor:
        """Fill the −1 entries: raster sampling, then `sweeps` full-context Gibbs sweeps."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return inpaint_full_context(self.prior, indices.to(self.device), sweeps, generator,
                                    proposals, temperature, self.sampler).cpu()

    def surprise(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 32, 32) indices → (B, 32, 32) bits: −log₂ p(index | earlier indices)."""
        return torch.cat([surprise_bits(self.prior, b.to(self.device)).cpu()
                          for b in indices.split(32)])


# ------------------------------------------------------------------ prior: whole-grid uses
@torch.no_grad()
def inpaint_full_context(prior: PixelCNN, indices: torch.Tensor, sweeps: int = GIBBS_SWEEPS,
                         generator: torch.Generator | None = None,
                         proposals: int = GIBBS_PROPOSALS,
                         temperature: float = 1.0, sampler: str = SAMPLER) -> torch.Tensor:
    """Fill every −1 in `indices` (B, H, W) by raster sampling, then update each filled site
    `sweeps` times in turn so that it follows p(site | every other index), given indices after
    it included; given indices are kept.

    p(site = k | rest) ∝ p(k | earlier sites) · Π over later sites s of p(i_s | sites before s).
    Each update draws `proposals` codes from the first factor, the site's own conditional, and
    picks among them and the current code with weights ∝ the second factor (one batched forward
    pass of the whole grid per site). This multiple-proposal step (Tjelmeland 2004; Calderhead
    2014) leaves the full conditional exactly invariant; keeping only the top codes instead
    would bias the fill towards likely codes (on the demo run: smooth, uniform fills).
    When no given index follows a hole, raster sampling already conditions on all of them and
    is returned.
    """
    holes = indices == -1
    grids = prior.sample(indices, temperature, generator, method=sampler)
    if sweeps < 1 or not given_after_holes(holes).any():
        return grids
    logits = prior(grids)
    sites = torch.nonzero(holes.any(dim=0)).tolist()  # raster order
    for _ in range(sweeps):
        for r, c in sites:
            items = torch.nonzero(holes[:, r, c]).squeeze(1)
            codes, new_logits = _gibbs_site(prior, grids[items], logits[items], r, c,
                                            proposals, temperature, generator)
            grids[items, r, c] = codes
            logits[items] = new_logits
    return grids


def _gibbs_site(prior: PixelCNN, grids: torch.Tensor, logits: torch.Tensor, r: int, c: int,
                proposals: int, temperature: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Update site (r, c) of each grid (B, H, W) given everything else; `logits` (B, K, H, W)
    are the prior's for the grids. Returns the new codes and the logits of the new grids."""
    own = torch.softmax(logits[:, :, r, c].double() / temperature, dim=1)
    drawn = torch.multinomial(own, proposals, replacement=True, generator=generator)  # (B, P)
    candidates = torch.cat([grids[:, r, c, None], drawn], dim=1)  # the current code first
    trials = grids.repeat_interleave(proposals, dim=0)
    trials[:, r, c] = drawn.flatten()
    trial_logits = prior(trials)
    later = torch.cat([later_log_likelihood(logits, grids, r, c)[:, None],
                       later_log_likelihood(trial_logits, trials, r, c).view(-1, proposals)], 1)
    pick = torch.multinomial(torch.softmax(later / temperature, dim=1), 1,
                             generator=generator).squeeze(1)
    rows = torch.arange(len(grids), device=grids.device)
    new_logits = logits.clone()
    moved = pick > 0
    new_logits[moved] = trial_logits.unflatten(0, drawn.shape)[rows[moved], pick[moved] - 1]
    return candidates[rows, pick], new_logits


def later_log_likelihood(logits: torch.Tensor, grids: torch.Tensor, r: int,
                         c: int) -> torch.Tensor:
    """(B,) log-likelihood of each grid's sites after (r, c) in raster order, from the prior's
    logits (B, K, H, W): the part of the grid's likelihood that the code at (r, c) changes
    besides its own conditional (earlier sites do not see it)."""
    log_p = -F.cross_entropy(logits, grids, reduction="none").flatten(1)
    return log_p[:, r * grids.shape[2] + c + 1:].double().sum(1)


@torch.no_grad()
def surprise_bits(prior: PixelCNN, indices: torch.Tensor) -> torch.Tensor:
    """(B, H, W) indices → (B, H, W) −log₂ p(index | earlier indices), from one forward pass."""
    return F.cross_entropy(prior(indices), indices, reduction="none") / math.log(2)


# ------------------------------------------------------------------------------------ masks
def bottom_half_mask(grid: int = 32) -> torch.Tensor:
    """(grid, grid) bool, True where indices are to be generated."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[grid // 2:] = True
    return mask


def centre_square_mask(grid: int = 32, side: int = 12) -> torch.Tensor:
    """(grid, grid) bool: a side × side square of sites in the middle (10:22 for 32, 12)."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    start = (grid - side) // 2
    mask[start:start + side, start:start + side] = True
    return mask


INPAINT_MASKS = {"bottom_half": bottom_half_mask(), "centre_square": centre_square_mask()}


def load_mask(path: Path, n_codes: int, grid: int = 32, image_size: int = 256) -> torch.Tensor:
    """A user mask → (grid, grid) bool, True where the prior fills in.

    A PNG (white/non-zero = fill) or a .npy array, at index-grid or image resolution; an
    image-resolution mask marks every site whose patch it touches. A .npy array holds 0/1, or
    is an index grid: −1 where to fill, valid code indices elsewhere."""
    if not path.is_file():
        raise RunError(f"mask {path} not found")
    try:
        array = (np.load(path) if path.suffix == ".npy"
                 else np.asarray(Image.open(path).convert("L")))
    except Exception as err:  # numpy and PIL raise many kinds
        raise RunError(f"mask {path} cannot be read ({type(err).__name__}); save it as a PNG "
                       "or a .npy array") from err
    if array.shape not in ((grid, grid), (image_size, image_size)):
        raise RunError(f"mask {path} is {array.shape}; it must be {grid}×{grid} (index grid) or "
                       f"{image_size}×{image_size} (image)")
    if path.suffix == ".npy":
        array = _npy_mask(path, array, n_codes)
    marked = np.asarray(array) != 0
    mask = torch.from_numpy(pixels_to_sites(marked, grid) if len(marked) == image_size else marked)
    if not mask.any():
        raise RunError(f"mask {path} marks nothing to inpaint: make the region to fill non-zero")
    return mask


def _npy_mask(path: Path, array: np.ndarray, n_codes: int) -> np.ndarray:
    """0/1 → as is; an index grid (−1 = fill, else a code index) → 1 where −1."""
    values = np.unique(array)
    if np.isin(values, (0, 1)).all():
        return array
    valid = (values == -1) | ((values >= 0) & (values < n_codes) & (values == np.round(values)))
    if not valid.all():
        raise RunError(f"mask {path} holds {values[~valid][0]}: use 0/1, or −1 (fill) and code "
                       f"indices in [0, {n_codes})")
    return array == -1


def show_mask(images: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Images with the masked sites' patches dimmed to a flat grey, for display."""
    return np.where(sites_to_pixels(mask, images.shape[-1]), 0.25, images)


# ---------------------------------------------------------------------------------- figures
def figure_reconstructions(run: Run, images: torch.Tensor, out: Path) -> None:
    indices = run.encode(images)
    recon = run.decode(indices)
    originals = run.to_unit(images)
    cells = [[o, i.numpy(), r] for o, i, r in zip(originals, indices, recon, strict=True)]
    save_grid(cells, out / "reconstructions.png", ["input", "code indices", "reconstruction"],
              index_cols=[1], n_codes=run.vqvae.cfg.n_codes)


def figure_generated(run: Run, n: int, temperature: float, seed: int, out: Path) -> None:
    start = time.time()
    indices = run.sample(torch.full((n, 32, 32), -1), temperature, seed)
    brains = run.decode(indices)
    print(f"generated {n} brains in {time.time() - start:.1f}s")
    per_row = min(n, 4)
    save_grid(_rows(list(indices.numpy()), per_row), out / "generated_indices.png",
              index_cols=range(per_row), n_codes=run.vqvae.cfg.n_codes)
    save_grid(_rows(list(brains), per_row), out / "generated_brains.png")


def figure_inpainting(run: Run, images: torch.Tensor, mask: torch.Tensor, temperature: float,
                      seed: int, path: Path) -> None:
    indices = run.encode(images)
    completed = run.decode(run.sample(apply_mask(indices, mask), temperature, seed))
    originals = run.to_unit(images)
    masked = show_mask(originals, mask)
    cells = [[o, m, c] for o, m, c in zip(originals, masked, completed, strict=True)]
    save_grid(cells, path, ["original", "masked", "completed"])


def figure_inpainting_methods(inpainting: evaluation.Inpainting, n: int, path: Path) -> None:
    """Originals, masked, raster-only and full-context completions of the first n images."""
    masked = show_mask(inpainting.originals, inpainting.mask)
    columns = (inpainting.originals, masked, inpainting.raster, inpainting.full)
    save_grid([list(row) for row in zip(*columns, strict=True)][:n], path,
              ["original", "masked", "raster", "full context"])


def figure_scores_by_slice(per_slice: dict[str, dict], path: Path) -> None:
    positions = [int(p) for p in per_slice]
    column = {key: [row[key] for row in per_slice.values()]
              for key in ("ssim", "ssim_brain", "psnr", "psnr_brain")}
    save_line_panels(positions, {
        "SSIM": {"whole slice": column["ssim"], "brain": column["ssim_brain"]},
        "PSNR (dB)": {"whole slice": column["psnr"], "brain": column["psnr_brain"]},
    }, path, "test reconstructions by slice position", "slice index")


def figure_surprise(study: evaluation.LesionStudy, n: int, path: Path) -> None:
    """Slices without and with a lesion (outlined in both), each beside its per-site surprise."""
    images = [[clean, clean, lesioned, lesioned]
              for clean, lesioned in zip(study.clean[:n], study.lesioned[:n], strict=True)]
    heat = [[None, cb, None, lb]
            for cb, lb in zip(study.clean_bits[:n], study.lesion_bits[:n], strict=True)]
    vmax = float(np.percentile(np.concatenate([study.clean_bits, study.lesion_bits]), 99.5))
    save_heatmap_grid(images, heat, path, ["test slice", "surprise", "with lesion", "surprise"],
                      vmax=vmax, label="−log₂ p(index | earlier) [bits]",
                      outlines=list(study.lesion_pixels[:n]))


def _rows(items: list[np.ndarray], per_row: int) -> list[list[np.ndarray]]:
    """Split into rows of `per_row`, padding the last row with blank cells."""
    items = items + [np.zeros_like(items[0])] * (-len(items) % per_row)
    return [items[i:i + per_row] for i in range(0, len(items), per_row)]


# ---------------------------------------------------------------------------------- outputs
def write_reconstructions(names: list[str], reconstructions: np.ndarray, folder: Path) -> None:
    """Each reconstruction as an 8-bit grayscale PNG named as its input (.png suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, to_uint8(reconstructions), strict=True):
        Image.fromarray(image).save(folder / Path(name).with_suffix(".png").name)
    print(f"{len(names)} reconstructions in {folder}")


def evaluate(run: Run, test: dataset.SliceSet, indices: torch.Tensor,
             reconstructions: np.ndarray, args: argparse.Namespace, out: Path) -> dict:
    """metrics.json's contents, and the figures that go with them."""
    metrics = _timed("reconstructions", evaluation.reconstruction_metrics, run, test, indices,
                     reconstructions)
    if "per_slice_position" in metrics:
        figure_scores_by_slice(metrics["per_slice_position"], out / "ssim_by_slice.png")
    metrics.update(_timed("samples", evaluation.sample_metrics, run, args.n_eval_samples,
                          args.temperature, args.seed, reconstructions))
    chosen = test.images[evenly_spaced(len(test), args.n_inpaint)]
    inpainting, completions = _timed(
        "inpainting", evaluation.inpainting_metrics, run, chosen, INPAINT_MASKS,
        args.temperature, args.seed, args.gibbs_sweeps, args.gibbs_proposals)
    metrics.update(inpainting)
    figure_inpainting_methods(completions["centre_square"], args.n_show,
                              out / "inpainting_centre_square.png")
    return metrics


def lesion_surprise(run: Run, test: dataset.SliceSet, args: argparse.Namespace,
                    out: Path) -> dict:
    """The synthetic-lesion study: surprise.json in the run, and its figure."""
    study = _timed("surprise", evaluation.lesion_study, run,
                   test.images[evenly_spaced(len(test), args.n_surprise)], args.seed)
    figure_surprise(study, min(args.n_show, 4), out / "surprise.png")
    metrics = evaluation.surprise_metrics(study)
    write_json(metrics, run.path / "surprise.json")
    return metrics


T = TypeVar("T")


def _timed(what: str, function: Callable[..., T], *args: Any) -> T:
    start = time.time()
    result = function(*args)
    print(f"{what}: {time.time() - start:.1f}s", flush=True)
    return result


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>40}: {value:.4f}")
        elif not isinstance(value, dict):
            print(f"{key:>40}: {value}")


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=RUN_DIR, help="run folder written by train.py")
    p.add_argument("--data", default=DATA_ROOT, help="dataset root (default: the run's)")
    p.add_argument("--evaluate", action="store_true", help="write metrics.json in the run")
    p.add_argument("--n-show", type=int, default=N_SHOW)
    p.add_argument("--n-samples", type=int, default=N_SAMPLES)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--mask", type=Path, help="inpainting mask: PNG/.npy, 32×32 or 256×256")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--sampler", choices=["fast", "naive"], default=SAMPLER,
                   help="PixelCNN sampler: cached (fast) or a forward pass per site (naive, "
                        "the reference); both give the same grids")
    p.add_argument("--reconstruct-dir", type=Path,
                   help="write every test reconstruction there as an 8-bit PNG, named as its "
                        "input")
    p.add_argument("--n-eval-samples", type=int, default=N_EVAL_SAMPLES,
                   help="generated brains scored for memorisation and diversity")
    p.add_argument("--n-inpaint", type=int, default=N_INPAINT,
                   help="test images inpainted for the inpainting metrics")
    p.add_argument("--gibbs-sweeps", type=int, default=GIBBS_SWEEPS,
                   help="full-context inpainting: Gibbs sweeps over the masked sites")
    p.add_argument("--gibbs-proposals", type=int, default=GIBBS_PROPOSALS,
                   help="full-context inpainting: codes drawn per site and update")
    p.add_argument("--surprise", action="store_true",
                   help="surprise maps of test slices with a synthetic lesion: "
                        "figures/surprise.png and surprise.json")
    p.add_argument("--n-surprise", type=int, default=N_SURPRISE,
                   help="test slices that get a lesion for --surprise")
    args = p.parse_args(argv)
    for flag in ("n_eval_samples", "n_inpaint", "gibbs_proposals", "n_surprise"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def run_predict(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    run = Run(Path(args.run), pick_device(), args.sampler)
    root = Path(args.data) if args.data else run.data_root
    test = dataset.load_splits(root, splits=("test",), spacing=run.spacing)["test"]
    out = run.path / "figures"
    show = test.images[torch.linspace(0, len(test) - 1, min(args.n_show, len(test))).long()]
    figure_reconstructions(run, show, out)
    figure_generated(run, args.n_samples, args.temperature, args.seed, out)
    figure_inpainting(run, show, bottom_half_mask(), args.temperature, args.seed,
                      out / "inpainting_bottom_half.png")
    if args.mask:
        mask = load_mask(args.mask, run.vqvae.cfg.n_codes)
        figure_inpainting(run, show, mask, args.temperature, args.seed,
                          out / "inpainting_custom.png")
    if args.evaluate or args.reconstruct_dir:
        indices = run.encode(test.images)
        reconstructions = run.decode(indices)
    if args.reconstruct_dir:
        write_reconstructions(test.names, reconstructions, args.reconstruct_dir)
    metrics = evaluate(run, test, indices, reconstructions, args, out) if args.evaluate else {}
    if args.surprise:
        metrics.update(lesion_surprise(run, test, args, out))
    print(f"figures in {out}")
    if args.evaluate:
        write_json(metrics, run.path / "metrics.json")
    _print_metrics(metrics)
    return run.path


def main(argv: list[str] | None = None) -> int:
    try:
        run_predict(parse_args(argv))
    except (RunError, dataset.DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
