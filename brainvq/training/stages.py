"""The training stages: the VQ-VAE on the slices, every split encoded once into index grids
(RUN/indices.pt), the VQ-VAE's decoder alone on those frozen grids, then the PixelCNN prior on
them. Each runs in `engine.fit`."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from brainvq.checkpoints import (
    INDICES_FILE,
    MIRRORED_TRAIN,
    checkpoint_path,
    indices_record,
    load_vqvae,
    refuse_overwrite,
    split_positions,
)
from brainvq.config import StageSettings
from brainvq.data.slices import SliceSet, evenly_spaced, relative_positions
from brainvq.distributed import (
    all_reduce_sum,
    all_reduce_tensor,
    data_parallel,
    is_main,
    shard,
    world,
)
from brainvq.evaluation.metrics import (
    codebook_stats,
    codebook_stats_from_counts,
    ssim_psnr_per_image,
    ssim_torch,
)
from brainvq.figures.plots import save_grid, save_loss_curves
from brainvq.inference.trained_run import autocast, encode_images, evaluate_prior, to_model_input
from brainvq.io_utils import RunError, load_checkpoint, save_checkpoint, write_csv, write_json
from brainvq.training import engine
from dataset import Normalisation, compute_normalisation
from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig, at_least_fp32, bits

N_GRID_IMAGES = 6  # validation images shown in the per-epoch reconstruction grid
COMPILE_BACKEND = "inductor"  # torch.compile's; the tests trace with "aot_eager" (no C++ build)


@dataclass
class RunOptions:
    """How a training run proceeds, beside its preset: where, from which seed, and whether it
    continues or replaces what the folder holds."""
    run: Path
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: epoch ends)
    compile: bool = False  # torch.compile the model for training (`compile_for_training`)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator,
                 margin: int = 16, lattice: int = 8) -> torch.Tensor:
    """(B, H, W) → (B, size, size) crops at random offsets on the code lattice (multiples of
    `lattice`), at least `margin` pixels in from the frame, where there is only background."""
    if not size or size >= images.shape[-1]:
        return images
    offsets = crop_offsets(len(images), images.shape[-1], size, generator, margin, lattice)
    return crop_at(images, offsets, size)


def crop_offsets(n: int, side: int, size: int, generator: torch.Generator, margin: int = 16,
                 lattice: int = 8) -> torch.Tensor:
    """(n, 2) random top-left corners of size × size crops of side × side images, multiples of
    `lattice` at least `margin` pixels in from the frame."""
    highest = (side - size - margin) // lattice
    return torch.randint(margin // lattice, highest + 1, (n, 2), generator=generator) * lattice


def crop_at(images: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(B, ..., H, W) → (B, ..., size, size): item b cut at offsets[b] = (row, column)."""
    return torch.stack([img[..., i:i + size, j:j + size]
                        for img, (i, j) in zip(images, offsets.tolist(), strict=True)])


def warmup_then_decay(optimiser: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                      decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up, then a cosine or linear decay to zero at `total_steps`."""
    warmup = max(1, min(warmup_steps, total_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if decay == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def make_optimiser(model: torch.nn.Module, stage: StageSettings,
                   device: torch.device) -> torch.optim.Optimizer:
    # On a CPU the multi-tensor (foreach) step makes the same updates as the per-tensor loop,
    # bit for bit, in ~70% of its time; the fused one is faster still but rounds differently.
    cuda = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay,
                             fused=cuda, foreach=not cuda)


def timing_text(row: dict[str, float], n_samples: int, unit: str) -> str:
    """An epoch's training time and throughput, and its validation time, for the log."""
    rate = n_samples / max(row["train_seconds"], 1e-9)
    return (f"training {row['train_seconds']:.0f}s, {rate:.0f} {unit}/s; "
            f"validation {row['val_seconds']:.0f}s")


def write_history(run: Path, stage: str, history: list[dict[str, float]], keys: list[str],
                  ylabel: str) -> None:
    write_csv(history, run / f"history_{stage}.csv")
    write_json(history, run / f"history_{stage}.json")
    save_loss_curves(history, keys, run / f"loss_{stage}.png", title=f"{stage} training",
                     ylabel=ylabel, log_y=stage == "vqvae")


def compile_for_training(model: torch.nn.Module) -> None:
    """torch.compile in place, so that the state dict keeps its keys: the prior whole, the
    VQ-VAE's encoder and decoder (their convolutions, norms and activations fuse) but not its
    quantiser, whose EMA and dead-code updates would break the graph every step."""
    for part in (model.encoder, model.decoder) if isinstance(model, VQVAE) else (model,):
        part.compile(backend=COMPILE_BACKEND)


def refuse_other_schedule(run: Path, stage: str, settings: StageSettings) -> None:
    """Refuse to resume a stage with settings other than those its last checkpoint was trained
    with: another schedule (epochs, batch, mirrored slices, ...) would not continue that run."""
    path = checkpoint_path(run, stage, "last")
    if not path.exists():
        return
    current = asdict(settings)
    saved = load_checkpoint(path).get("stage_settings", current)
    # a field the checkpoint predates has its default (StageSettings fills it in)
    trained = asdict(StageSettings(**{k: v for k, v in saved.items() if k in current}))
    changed = {name: (value, current[name]) for name, value in trained.items()
               if value != current[name]}
    if changed:
        was = ", ".join(f"{name} {old} (now {new})" for name, (old, new) in changed.items())
        raise RunError(f"{path} was trained with {was}; resume with the flags it was trained "
                       "with, or use --overwrite")


def make_stage(name: str, model: torch.nn.Module, settings: StageSettings, n_samples: int,
               options: RunOptions, device: torch.device, **parts: Any) -> engine.Stage:
    """An `engine.Stage` with AdamW and a warm-up, then the settings' decay, over all its steps."""
    if options.compile:
        compile_for_training(model)
    optimiser = make_optimiser(model, settings, device)
    steps = settings.epochs * math.ceil(n_samples / settings.batch_size)
    return engine.Stage(
        name=name, model=data_parallel(model, device), optimiser=optimiser,
        scheduler=warmup_then_decay(optimiser, steps, settings.warmup_steps,
                                    settings.lr_decay),
        epochs=settings.epochs, n_samples=n_samples, batch_size=settings.batch_size,
        seed=options.seed, grad_clip=settings.grad_clip,
        checkpoint_every=options.checkpoint_every,
        **parts)


# ------------------------------------------------------------------------- stage 1: VQ-VAE
def vqvae_losses(model: torch.nn.Module, x: torch.Tensor, settings: StageSettings,
                 norm: Normalisation) -> dict[str, torch.Tensor]:
    out = model(x)
    reconstruction = at_least_fp32(out.reconstruction)
    recon = F.mse_loss(reconstruction, x)
    loss = with_image_terms(recon + out.vq_loss, reconstruction, x, settings, norm)
    return {"loss": loss, "recon": recon, "codebook": out.codebook_loss,
            "commitment": out.commitment_loss}


def with_image_terms(loss: torch.Tensor, reconstruction: torch.Tensor, x: torch.Tensor,
                     settings: StageSettings, norm: Normalisation) -> torch.Tensor:
    """`loss` plus the L1 and (1 − SSIM) terms that `settings` weigh, of a (B, 1, H, W)
    reconstruction (at least fp32) of the normalised images x."""
    if settings.l1_weight:
        loss = loss + settings.l1_weight * F.l1_loss(reconstruction, x)
    if settings.ssim_weight:
        # SSIM's constants assume [0, 1] pixels: score the images on that scale (unclamped,
        # so that out-of-range pixels still get gradients).
        reference, image = (t * norm.std + norm.mean for t in (x, reconstruction))
        similarity = ssim_torch(reference, image)
        loss = loss + settings.ssim_weight * (1 - similarity)
    return loss


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, images: torch.Tensor, norm: Normalisation,
                   device: torch.device, batch_size: int) -> dict[str, float]:
    """Validation losses, SSIM/PSNR in [0, 1] and codebook health over the whole split (each
    rank scores its share of the split; the sums are reduced across ranks)."""
    model.eval()
    sums: dict[str, float] = {}
    counts = torch.zeros(model.cfg.n_codes, dtype=torch.float64)
    for batch in shard(torch.arange(len(images))).split(batch_size):
        x = to_model_input(images[batch], norm, device)
        with autocast(device):
            out = model(x)
        recon = out.reconstruction.float()
        ssim, psnr = ssim_psnr_per_image(norm.denormalise(x), norm.denormalise(recon))
        parts = {"recon": F.mse_loss(recon, x).item() * len(batch),
                 "codebook": out.codebook_loss.item() * len(batch),
                 "commitment": out.commitment_loss.item() * len(batch),
                 "ssim": ssim.sum().item(), "psnr": psnr.sum().item()}
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=model.cfg.n_codes)
    sums = all_reduce_sum(sums)
    if world()[1] > 1:
        all_reduce_tensor(counts)
    return {**{f"val_{k}": v / len(images) for k, v in sums.items()},
            **codebook_stats_from_counts(counts)}


@torch.no_grad()
def save_reconstruction_grid(model: VQVAE, images: torch.Tensor, norm: Normalisation,
                             device: torch.device, path: Path) -> None:
    model.eval()
    x = to_model_input(images, norm, device)
    recon = norm.denormalise(model(x).reconstruction.float().cpu())[:, 0].numpy()
    original = norm.denormalise(x.cpu())[:, 0].numpy()
    save_grid([list(original), list(recon)], path, row_titles=["input", "reconstruction"])


def vqvae_stage(model: VQVAE, settings: StageSettings, images: torch.Tensor, norm: Normalisation,
                options: RunOptions, device: torch.device, **parts: Any) -> engine.Stage:
    """The VQ-VAE's stage on uint8 training `images` (N, H, W): random crops, its losses."""

    def step(trained: torch.nn.Module, batch: torch.Tensor,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
        # crops for the whole global batch, so the RNG advances alike on every rank
        crops = random_crops(images[batch % len(images)], settings.crop, generator)
        with autocast(device):
            return vqvae_losses(trained, to_model_input(shard(crops), norm, device),
                                settings, norm)

    return make_stage("vqvae", model, settings, len(images) * settings.crops_per_image, options,
                      device, step=step, **parts)


def train_vqvae(cfg: VQVAEConfig, settings: StageSettings, splits: dict[str, SliceSet],
                options: RunOptions, device: torch.device, data: dict[str, Any]) -> None:
    """Stage 1 into options.run; `data` (the data root and spacing) goes into the checkpoints."""
    run = options.run
    refuse_overwrite(run, "vqvae", options.overwrite, options.resume)
    if not options.resume:  # a decoder refined on an earlier VQ-VAE's code would not fit it
        for which in ("last", "best"):
            checkpoint_path(run, "decoder", which).unlink(missing_ok=True)
    train_images, val_images = splits["train"].images, splits["validate"].images
    norm = compute_normalisation(train_images)
    model = VQVAE(cfg).to(device).to(memory_format=torch.channels_last)
    grid_images = val_images[evenly_spaced(len(val_images), N_GRID_IMAGES)]
    n_crops = len(train_images) * settings.crops_per_image

    def after_epoch(epoch: int, row: dict[str, float], history: list[dict[str, float]]) -> None:
        save_reconstruction_grid(model, grid_images, norm, device,
                                 run / "reconstructions" / f"epoch_{epoch:03d}.png")
        write_history(run, "vqvae", history, ["train_recon", "val_recon", "train_commitment",
                                              "val_commitment", "val_codebook"], "MSE")
        print(f"vqvae epoch {epoch}: recon {row['train_recon']:.4f}/{row['val_recon']:.4f} "
              f"val SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} "
              f"codes used {row['codebook_usage']:.1%} perplexity "
              f"{row['codebook_perplexity']:.1f} ({timing_text(row, n_crops, 'crops')})",
              flush=True)

    stage = vqvae_stage(
        model, settings, train_images, norm, options, device, monitor="val_recon",
        after_epoch=after_epoch,
        evaluate=lambda: evaluate_vqvae(model, val_images, norm, device, settings.batch_size),
        checkpoint_extra=lambda: {"model_config": asdict(cfg), "stage_settings": asdict(settings),
                                  "normalisation": norm.to_dict(), **data})
    engine.fit(stage, run, options.resume)


# ---------------------------------------------------------------- encoding between the stages
def encode_splits(run: Path, splits: dict[str, SliceSet], device: torch.device,
                  mirror: bool = False) -> dict[str, Any]:
    """Encode every split with the best VQ-VAE and store the grids in run/indices.pt; with
    `mirror`, the training slices' mirror images too (as the split MIRRORED_TRAIN)."""
    model, norm, state = load_vqvae(checkpoint_path(run, "vqvae", "best"), device)
    encoded = {name: (encode_images(model, split.images, norm, device), split.names,
                      relative_positions(split.names)) for name, split in splits.items()}
    if mirror:
        train = splits["train"]
        encoded[MIRRORED_TRAIN] = (encode_images(model, train.images.flip(-1), norm, device),
                                   train.names, relative_positions(train.names))
    indices = indices_record(state["epoch"], model.cfg.n_codes, encoded)
    if is_main():
        save_checkpoint(indices, run / INDICES_FILE)
        report_codebook_usage(run, {name: indices[name] for name in splits}, model.cfg.n_codes)
    return indices


def report_codebook_usage(run: Path, grids: dict[str, torch.Tensor], n_codes: int) -> None:
    """Codes used and perplexity of each split's index grids: printed, and in codebook.json."""
    stats = {name: codebook_stats(g, n_codes) for name, g in grids.items()}
    write_json(stats, run / "codebook.json")
    print(f"codebook (K = {n_codes}): " + ", ".join(
        f"{name} {row['codes_used']} used ({row['codebook_usage']:.1%}), perplexity "
        f"{row['codebook_perplexity']:.1f}" for name, row in stats.items()), flush=True)


# ----------------------------------------------------- stage 1b: the decoder on the frozen code
def aligned_crops(images: torch.Tensor, grids: torch.Tensor, size: int, down: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random size × size crops of uint8 (B, H, W) `images` and the matching crops of their
    (B, H / down, W / down) code `grids`, cut on the code's lattice."""
    if not size or size >= images.shape[-1]:
        return images, grids
    offsets = crop_offsets(len(images), images.shape[-1], size, generator, lattice=down)
    return crop_at(images, offsets, size), crop_at(grids, offsets // down, size // down)


def train_decoder(settings: StageSettings, splits: dict[str, SliceSet], indices: dict[str, Any],
                  options: RunOptions, device: torch.device) -> None:
    """Stage 1b into options.run: the best VQ-VAE's decoder trained on alone from the training
    slices' codes in `indices` (a run's indices.pt). The encoder and the codebook stay frozen,
    so every index, and the prior trained on them, stays as it is."""
    run = options.run
    refuse_overwrite(run, "decoder", options.overwrite, options.resume)
    with torch.random.fork_rng(devices=[]):  # the prior's initialisation stays the same
        model, norm, state = load_vqvae(checkpoint_path(run, "vqvae", "best"), device)
    model = model.to(memory_format=torch.channels_last)  # in eval mode: the codebook stays
    images, grids = splits["train"].images, indices["train"]
    val_images = splits["validate"].images
    grid_images = val_images[evenly_spaced(len(val_images), N_GRID_IMAGES)]

    def step(trained: torch.nn.Module, batch: torch.Tensor,
             generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = batch % len(images)
        crops, codes = aligned_crops(images[ids], grids[ids], settings.crop,
                                     model.cfg.downsampling, generator)
        x = to_model_input(shard(crops), norm, device)
        with torch.no_grad():  # the codebook is frozen
            latents = model.indices_to_latents(shard(codes).to(device).long())
        with autocast(device):
            reconstruction = at_least_fp32(
                trained(latents.contiguous(memory_format=torch.channels_last)))
        recon = F.mse_loss(reconstruction, x)
        return {"loss": with_image_terms(recon, reconstruction, x, settings, norm),
                "recon": recon}

    def after_epoch(epoch: int, row: dict[str, float], history: list[dict[str, float]]) -> None:
        save_reconstruction_grid(model, grid_images, norm, device,
                                 run / "reconstructions" / f"decoder_epoch_{epoch:03d}.png")
        write_history(run, "decoder", history, ["train_recon", "val_recon"], "MSE")
        print(f"decoder epoch {epoch}: recon {row['train_recon']:.4f}/{row['val_recon']:.4f} "
              f"val SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} "
              f"({timing_text(row, n_crops, 'crops')})", flush=True)

    n_crops = len(images) * settings.crops_per_image
    stage = make_stage(
        "decoder", model.decoder, settings, n_crops, options, device, step=step,
        monitor="val_recon", after_epoch=after_epoch,
        # the VQ-VAE's own validation: its reconstructions are decoded from the frozen code
        evaluate=lambda: evaluate_vqvae(model, val_images, norm, device, settings.batch_size),
        checkpoint_extra=lambda: {"model_config": asdict(model.cfg),
                                  "stage_settings": asdict(settings),
                                  "normalisation": norm.to_dict(), "vqvae_epoch": state["epoch"],
                                  "codebook": model.quantiser.codebook.detach().cpu()})
    engine.fit(stage, run, options.resume)


# ------------------------------------------------------------------------ stage 2: PixelCNN
def prior_training_grids(indices: dict[str, Any],
                         mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's training grids (N, H, W) and their positions (N,) from a run's indices.pt;
    with `mirror`, the training slices' mirror images follow them."""
    splits = ("train", MIRRORED_TRAIN) if mirror else ("train",)
    return (torch.cat([indices[s] for s in splits]),
            torch.cat([split_positions(indices, s) for s in splits]))


def place_prior(model: PixelCNN, device: torch.device) -> PixelCNN:
    """The prior on `device`, its weights channels-last for training."""
    # The embedded input (B, H, W, C) → (B, C, H, W) is channels-last in memory; weights in that
    # format spare the convolutions a layout copy each way (~10% of a CPU step at the demo size).
    return model.to(device).to(memory_format=torch.channels_last)


def train_prior(cfg: PriorConfig, settings: StageSettings, indices: dict[str, Any],
                options: RunOptions, device: torch.device) -> None:
    """Stage 2 into options.run, on the grids of `indices` (a run's indices.pt)."""
    run = options.run
    refuse_overwrite(run, "prior", options.overwrite, options.resume)
    cfg = PriorConfig(**{**asdict(cfg), "n_codes": indices["n_codes"]})
    train_grids, train_positions = prior_training_grids(indices, settings.mirror)
    val_grids, val_positions = indices["validate"], split_positions(indices, "validate")
    model = PixelCNN(cfg)
    if settings.embed_from_codebook:
        model.embed_like(load_checkpoint(checkpoint_path(run, "vqvae", "best"))["model"]
                         ["quantiser.codebook"])
    model = place_prior(model, device)

    def step(trained: torch.nn.Module, batch: torch.Tensor,
             _generator: torch.Generator) -> dict[str, torch.Tensor]:
        with autocast(device):
            loss = prior_loss(trained, shard(train_grids[batch]).long().to(device),
                              shard(train_positions[batch]).to(device))
        return {"loss": loss, "bits_per_index": loss.detach()}

    def after_epoch(epoch: int, row: dict[str, float], history: list[dict[str, float]]) -> None:
        write_history(run, "prior", history, ["train_bits_per_index", "val_bits_per_index"],
                      "bits per index")
        print(f"prior epoch {epoch}: bits/index {row['train_bits_per_index']:.3f}/"
              f"{row['val_bits_per_index']:.3f} ({timing_text(row, len(train_grids), 'grids')})",
              flush=True)

    stage = make_stage(
        "prior", model, settings, len(train_grids), options, device, step=step,
        monitor="val_bits_per_index", after_epoch=after_epoch,
        evaluate=lambda: {"val_bits_per_index": evaluate_prior(
            model, val_grids, device, settings.batch_size, val_positions)},
        checkpoint_extra=lambda: {"model_config": asdict(cfg), "stage_settings": asdict(settings),
                                  "vqvae_epoch": indices["vqvae_epoch"]})
    engine.fit(stage, run, options.resume)


def prior_loss(model: torch.nn.Module, grids: torch.Tensor,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """Bits per index through the (possibly data-parallel) model's forward."""
    return bits(model(grids, positions), grids, reduction="mean")

