"""Use a trained run: reconstruct test slices, generate new brains with the PixelCNN prior,
inpaint masked regions, and (with --evaluate) write metrics.json.

    python predict.py                      # figures for runs/demo
    python predict.py --run runs/oasis --evaluate --mask my_mask.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
from io_utils import RunError, load_checkpoint, write_json
from metrics import batch_scores, codebook_stats, mean_scores
from modules import PixelCNN, PriorConfig
from plots import save_grid
from train import (
    encode_images,
    evaluate_prior,
    load_vqvae,
    pick_device,
    stage_checkpoint,
)

# ---- Edit these, or override them with command-line flags --------------------------------
RUN_DIR = "runs/demo"
DATA_ROOT: str | None = None  # None: the data the run was trained on
N_SHOW = 6  # test images in the reconstruction and inpainting figures
N_SAMPLES = 8  # brains generated from scratch
TEMPERATURE = 1.0
SEED = 0
# --------------------------------------------------------------------------------------------


class Run:
    """The trained models of a run folder, rebuilt from their checkpoints alone."""

    def __init__(self, run: Path, device: torch.device) -> None:
        self.path, self.device = run, device
        self.vqvae, self.norm, state = load_vqvae(stage_checkpoint(run, "vqvae", "best"), device)
        self.data_root = Path(state["data_root"])
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
        return self.prior.sample(indices.to(self.device), temperature, generator).cpu()


def load_prior(path: Path, device: torch.device) -> PixelCNN:
    state = load_checkpoint(path)
    model = PixelCNN(PriorConfig(**state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"{path} does not match its own config: {str(err).splitlines()[0]}") \
            from err
    return model.to(device).eval()


# ------------------------------------------------------------------------------------ masks
def bottom_half_mask(grid: int = 32) -> torch.Tensor:
    """(grid, grid) bool, True where indices are to be generated."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[grid // 2:] = True
    return mask


def load_mask(path: Path, grid: int = 32, image_size: int = 256) -> torch.Tensor:
    """A user mask (PNG or .npy, white/non-zero = fill in) at index-grid or image resolution
    → (grid, grid) bool; an image-resolution mask marks every site whose patch it touches."""
    if not path.is_file():
        raise RunError(f"mask {path} not found")
    array = np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path).convert("L"))
    if array.shape not in ((grid, grid), (image_size, image_size)):
        raise RunError(f"mask {path} is {array.shape}; it must be {grid}×{grid} (index grid) or "
                       f"{image_size}×{image_size} (image)")
    mask = torch.from_numpy(np.asarray(array) != 0)
    if mask.shape[0] == image_size:
        patch = image_size // grid
        mask = mask.view(grid, patch, grid, patch).any(dim=3).any(dim=1)
    if not mask.any():
        raise RunError(f"mask {path} marks nothing to inpaint: make the region to fill non-zero")
    return mask


def apply_mask(indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = indices.clone()
    masked[:, mask] = -1
    return masked


def show_mask(images: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Images with the masked sites' patches dimmed to a flat grey, for display."""
    patch = images.shape[-1] // mask.shape[-1]
    big = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
    return np.where(big, 0.25, images)


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


def _rows(items: list[np.ndarray], per_row: int) -> list[list[np.ndarray]]:
    """Split into rows of `per_row`, padding the last row with blank cells."""
    items = items + [np.zeros_like(items[0])] * (-len(items) % per_row)
    return [items[i:i + per_row] for i in range(0, len(items), per_row)]


# ---------------------------------------------------------------------------------- metrics
def evaluate(run: Run, test: dataset.SliceSet) -> dict[str, float]:
    indices = run.encode(test.images)
    scores = mean_scores(batch_scores(torch.from_numpy(run.to_unit(test.images)),
                                      torch.from_numpy(run.decode(indices))))
    metrics = {f"test_{k}": v for k, v in scores.items()}
    metrics.update(codebook_stats(indices, run.vqvae.cfg.n_codes))
    metrics["prior_test_bits_per_index"] = evaluate_prior(run.prior, indices, run.device, 32)
    metrics["n_test_images"] = len(test)
    return metrics


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
    return p.parse_args(argv)


def run_predict(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    run = Run(Path(args.run), pick_device())
    root = Path(args.data) if args.data else run.data_root
    test = dataset.load_split(dataset.find_split_dirs(root)["test"])
    out = run.path / "figures"
    show = test.images[torch.linspace(0, len(test) - 1, min(args.n_show, len(test))).long()]
    figure_reconstructions(run, show, out)
    figure_generated(run, args.n_samples, args.temperature, args.seed, out)
    figure_inpainting(run, show, bottom_half_mask(), args.temperature, args.seed,
                      out / "inpainting_bottom_half.png")
    if args.mask:
        figure_inpainting(run, show, load_mask(args.mask), args.temperature, args.seed,
                          out / "inpainting_custom.png")
    print(f"figures in {out}")
    if args.evaluate:
        metrics = evaluate(run, test)
        write_json(metrics, run.path / "metrics.json")
        print("\n".join(f"{k:>28}: {v:.4f}" for k, v in metrics.items()))
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
