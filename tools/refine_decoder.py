"""Refine a run's VQ-VAE decoder on its frozen code: better reconstructions, the same indices.

The encoder and the codebook stay as they are, so every split's grid of indices, the prior
trained on them and its bits per index do not change; only the decoder trains on, from the
training slices' codes, with the VQ-VAE stage's crops, batch size and loss. It
writes a copy of the run with the refined decoder to --out and prints the test split's
reconstruction scores before and after; `predict.py --run OUT` then decodes with it
(docs/experiments.md#the-decoder-alone-on-a-frozen-code).

    python -m tools.refine_decoder --run runs/demo --epochs 4 --out runs/demo_refined
    python predict.py --run runs/demo_refined --evaluate
"""
from __future__ import annotations

import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

import dataset
from brainvq.checkpoints import checkpoint_path, load_vqvae
from brainvq.cli import script_parser
from brainvq.config import DEFAULT_RUN, StageSettings
from brainvq.data.slices import to_unit
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation.metrics import batch_scores, mean_scores
from brainvq.inference.trained_run import decode_indices, encode_images, to_model_input
from brainvq.io_utils import RunError, save_checkpoint
from brainvq.training.stages import (
    crop_at,
    crop_offsets,
    make_optimiser,
    warmup_then_decay,
    with_image_terms,
)
from dataset import Normalisation
from modules import VQVAE

SCORES = ("ssim", "ssim_brain", "psnr")
CHANNELS_LAST = torch.channels_last


def refine(model: VQVAE, grids: torch.Tensor, images: torch.Tensor, norm: Normalisation,
           settings: StageSettings, seed: int) -> list[float]:
    """Train `model.decoder` for settings.epochs on the uint8 slices `images` (N, H, W) and
    their frozen codes `grids` (N, h, w): settings.crops_per_image aligned crops of each slice
    and of its grid per epoch. Returns each epoch's mean loss."""
    device = next(model.parameters()).device
    optimiser = make_optimiser(model.decoder, settings, device)
    down = model.cfg.downsampling
    size = settings.crop if 0 < settings.crop < images.shape[-1] else images.shape[-1]
    n = len(images) * settings.crops_per_image
    steps_per_epoch = math.ceil(n / settings.batch_size)
    schedule = warmup_then_decay(optimiser, settings.epochs * steps_per_epoch,
                                 settings.warmup_steps, settings.lr_decay)
    generator = torch.Generator().manual_seed(seed)
    model.eval()  # the quantiser must not move its codebook
    model.decoder.to(memory_format=CHANNELS_LAST).train()  # as the VQ-VAE stage trains it
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator) % len(images)
        total = 0.0
        for batch in order.split(settings.batch_size):
            offsets = (crop_offsets(len(batch), images.shape[-1], size, generator)
                       if size < images.shape[-1] else torch.zeros(len(batch), 2, dtype=torch.long))
            x = to_model_input(crop_at(images[batch], offsets, size), norm, device)
            codes = crop_at(grids[batch], offsets // down, size // down).to(device).long()
            latents = model.indices_to_latents(codes).contiguous(memory_format=CHANNELS_LAST)
            reconstruction = model.decoder(latents).float()
            loss = with_image_terms(torch.nn.functional.mse_loss(reconstruction, x),
                                    reconstruction, x, settings, norm)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), settings.grad_clip)
            optimiser.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
    model.eval()
    return losses


def reconstruction_scores(model: VQVAE, grids: torch.Tensor, images: torch.Tensor,
                          norm: Normalisation) -> dict[str, float]:
    """Mean SSIM, in-brain SSIM and PSNR of the slices `images` decoded from their `grids`."""
    decoded = decode_indices(model, grids, norm, next(model.parameters()).device)
    rows = batch_scores(torch.from_numpy(to_unit(images)), torch.from_numpy(decoded))
    return {k: v for k, v in mean_scores(rows).items() if k in SCORES}


def check_out(run: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == run.resolve():
        raise RunError("--out must differ from --run: the run keeps its own decoder")
    if out.exists() and not overwrite:
        raise RunError(f"{out} exists: pass --overwrite or another --out")


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.refine_decoder")
    p.add_argument("--run", type=Path, default=Path(DEFAULT_RUN))
    p.add_argument("--out", type=Path, required=True, help="the copy with the refined decoder")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak learning rate, decayed as the run's VQ-VAE stage decayed its own")
    p.add_argument("--data", type=Path, help="the run's data root (default: the checkpoint's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        check_out(args.run, args.out, args.overwrite)
        device = choose_device(args.device)
        path = checkpoint_path(args.run, "vqvae", "best")
        model, norm, state = load_vqvae(path, device)
        settings = replace(StageSettings(**state["stage_settings"]), epochs=args.epochs,
                           lr=args.lr)
        root = args.data or Path(state["data_root"])
        splits = dataset.load_splits(root, splits=("train", "test"))
        train, test = splits["train"], splits["test"]
        grids = {name: encode_images(model, s.images, norm, device)  # the frozen encoder's
                 for name, s in (("train", train), ("test", test))}
        before = reconstruction_scores(model, grids["test"], test.images, norm)
        losses = refine(model, grids["train"], train.images, norm, settings, args.seed)
        after = reconstruction_scores(model, grids["test"], test.images, norm)
        shutil.copytree(args.run, args.out, dirs_exist_ok=True)  # its prior, indices, ...
        refinement = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                      "train_loss_by_epoch": losses, "test_before": before,
                      "test_after": after, "refined_from": str(args.run)}
        save_checkpoint({**state, "model": model.state_dict(),
                         "decoder_refinement": refinement},
                        checkpoint_path(args.out, "vqvae", "best"))
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"decoder refined for {args.epochs} epochs, loss by epoch "
          + " → ".join(f"{v:.4f}" for v in losses))
    for name in SCORES:
        print(f"test {name}: {before[name]:.4f} → {after[name]:.4f}")
    print(f"written: {checkpoint_path(args.out, 'vqvae', 'best')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
