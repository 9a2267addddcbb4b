"""Train the VQ-VAE (stage 1), encode every split to code indices once, then train the gated
PixelCNN prior on those indices (stage 2).

    python train.py                                   # demo: embedded MNI152-derived slices
    python train.py --data /path/to/OASIS --out runs/oasis --profile full
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import dataset
import engine
from io_utils import RunError, load_checkpoint, save_checkpoint, write_csv, write_json
from metrics import batch_scores, codebook_stats, codebook_stats_from_counts, ssim_torch
from modules import VQVAE, PixelCNN, PriorConfig, VQVAEConfig, at_least_fp32
from plots import save_grid, save_loss_curves

# ---- Edit these, or override them with command-line flags --------------------------------
DATA_ROOT: str | None = None  # None: the embedded demo set (real MNI152 MRI), built on first use
OUT_DIR = "runs/demo"
PROFILE = "demo"  # "demo": sized for a 2-core CPU; "full": paper settings for a GPU and OASIS;
#                   "tiny": a seconds-long smoke test
VQVAE_EPOCHS: int | None = None  # None: the profile's value (as for every size below)
PRIOR_EPOCHS: int | None = None
BATCH_SIZE: int | None = None
N_CODES: int | None = None  # K
EMBEDDING_DIM: int | None = None  # D
BETA: float | None = None
VQVAE_LR: float | None = None
PRIOR_LR: float | None = None
SPACING_MM = 1.0  # volumes (NIfTI/Analyze) are resampled to this voxel size; 0 keeps theirs
SEED = 0
# --------------------------------------------------------------------------------------------

N_GRID_IMAGES = 6  # validation images shown in the per-epoch reconstruction grid


@dataclass
class StageSettings:
    """Optimisation settings of one stage; saved in its checkpoints."""
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 100
    l1_weight: float = 0.0  # VQ-VAE only: extra L1 term on the reconstruction
    ssim_weight: float = 0.0  # VQ-VAE only: extra (1 − SSIM) term, SSIM on [0, 1] pixels
    grad_clip: float = 1.0
    # VQ-VAE only: train on random crops (0: whole slices). The model is fully convolutional
    # with per-pixel normalisation, so it then runs unchanged on whole slices; crops spend the
    # compute on brain instead of the black background that fills half of every slice.
    crop: int = 0
    crops_per_image: int = 1  # crops taken from each training image per epoch
    # prior only: start the prior's input embedding from the VQ-VAE codebook's principal
    # components (PixelCNN.embed_like), so similar codes start with similar embeddings
    embed_from_codebook: bool = False


PROFILES: dict[str, dict[str, Any]] = {
    "demo": {
        "vqvae": VQVAEConfig(),
        "prior": PriorConfig(channels=48),
        # Small batches: on a CPU the time per sample hardly depends on the batch, so a
        # fixed budget buys many more updates, which is what these small models need.
        "vqvae_stage": StageSettings(epochs=14, batch_size=4, lr=2e-3, ssim_weight=1.0,
                                     crop=128, crops_per_image=2),
        "prior_stage": StageSettings(epochs=3, batch_size=8, lr=5e-3, embed_from_codebook=True),
    },
    "tiny": {  # smoke tests: seconds on a CPU, not a useful model
        "vqvae": VQVAEConfig(hidden=(8, 8, 16), n_res_blocks=1, embedding_dim=8, n_codes=32),
        "prior": PriorConfig(channels=16, dilations=(1, 2, 4, 8, 16, 1)),
        "vqvae_stage": StageSettings(epochs=1, batch_size=8, lr=2e-3, warmup_steps=1, crop=128,
                                     crops_per_image=2, ssim_weight=1.0),
        "prior_stage": StageSettings(epochs=1, batch_size=8, lr=2e-3, warmup_steps=1,
                                     embed_from_codebook=True),
    },
    "full": {
        "vqvae": VQVAEConfig(hidden=(64, 128, 256), n_res_blocks=4, embedding_dim=64,
                             n_codes=512),
        "prior": PriorConfig(channels=128,
                             dilations=(1, 2, 4, 8, 16, 1, 2, 4, 8, 16, 1, 2, 4, 1, 1)),
        "vqvae_stage": StageSettings(epochs=100, batch_size=32, lr=1e-3, warmup_steps=500,
                                     ssim_weight=1.0),
        "prior_stage": StageSettings(epochs=100, batch_size=64, lr=1e-3, warmup_steps=500,
                                     embed_from_codebook=True),
    },
}


# ---------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator,
                 margin: int = 16, lattice: int = 8) -> torch.Tensor:
    """(B, H, W) → (B, size, size) crops at random offsets on the code lattice (multiples of
    `lattice`), at least `margin` pixels in from the frame, where there is only background."""
    if not size or size >= images.shape[-1]:
        return images
    highest = (images.shape[-1] - size - margin) // lattice
    offsets = torch.randint(margin // lattice, highest + 1, (len(images), 2),
                            generator=generator) * lattice
    return torch.stack([img[i:i + size, j:j + size]
                        for img, (i, j) in zip(images, offsets.tolist(), strict=True)])


def warmup_cosine(optimiser: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(warmup_steps, total_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def make_optimiser(model: torch.nn.Module, stage: StageSettings,
                   device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay,
                             fused=device.type == "cuda")


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (the quantiser keeps fp32 itself); a no-op on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


def to_model_input(images: torch.Tensor, norm: dataset.Normalisation,
                   device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) → normalised float (B, 1, H, W), channels_last on `device`."""
    # Moved as uint8 and normalised there: a quarter of the bytes of float32 to copy to a GPU.
    return norm.normalise(images.to(device)).contiguous(memory_format=torch.channels_last)


def stage_checkpoint(run: Path, stage: str, which: str) -> Path:
    return run / f"{stage}_{which}.pt"


def refuse_overwrite(run: Path, stage: str, args: argparse.Namespace) -> None:
    if stage_checkpoint(run, stage, "last").exists() and not (args.overwrite or args.resume):
        raise RunError(f"{run} already holds a trained {stage}: pass --resume to continue it, "
                       f"--overwrite to start again, or --out NEW_DIR")


def resolve_data_root(data: str | None) -> Path:
    if data:
        return Path(data).expanduser()
    return dataset.build_demo_dataset(dataset.demo_root())


def write_history(run: Path, stage: str, history: list[dict[str, float]], keys: list[str],
                  ylabel: str) -> None:
    write_csv(history, run / f"history_{stage}.csv")
    write_json(history, run / f"history_{stage}.json")
    save_loss_curves(history, keys, run / f"loss_{stage}.png", title=f"{stage} training",
                     ylabel=ylabel, log_y=stage == "vqvae")


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Wrap in DistributedDataParallel under torchrun; the model itself otherwise."""
    if engine.world()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def make_stage(name: str, model: torch.nn.Module, settings: StageSettings, n_samples: int,
               args: argparse.Namespace, device: torch.device, **parts: Any) -> engine.Stage:
    optimiser = make_optimiser(model, settings, device)
    steps = settings.epochs * math.ceil(n_samples / settings.batch_size)
    return engine.Stage(
        name=name, model=data_parallel(model, device), optimiser=optimiser,
        scheduler=warmup_cosine(optimiser, steps, settings.warmup_steps),
        epochs=settings.epochs, n_samples=n_samples, batch_size=settings.batch_size,
        seed=args.seed, grad_clip=settings.grad_clip, checkpoint_every=args.checkpoint_every,
        **parts)


# ------------------------------------------------------------------------- stage 1: VQ-VAE
def vqvae_losses(model: torch.nn.Module, x: torch.Tensor, settings: StageSettings,
                 norm: dataset.Normalisation) -> dict[str, torch.Tensor]:
    out = model(x)
    reconstruction = at_least_fp32(out.reconstruction)
    recon = F.mse_loss(reconstruction, x)
    loss = recon + out.vq_loss
    if settings.l1_weight:
        loss = loss + settings.l1_weight * F.l1_loss(reconstruction, x)
    if settings.ssim_weight:
        # SSIM's constants assume [0, 1] pixels: score the images on that scale (unclamped,
        # so that out-of-range pixels still get gradients).
        reference, image = (t * norm.std + norm.mean for t in (x, reconstruction))
        similarity = ssim_torch(reference, image)
        loss = loss + settings.ssim_weight * (1 - similarity)
    return {"loss": loss, "recon": recon, "codebook": out.codebook_loss,
            "commitment": out.commitment_loss}


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, images: torch.Tensor, norm: dataset.Normalisation,
                   device: torch.device, batch_size: int) -> dict[str, float]:
    """Validation losses, SSIM/PSNR in [0, 1] and codebook health over the whole split (each
    rank scores its share of the split; the sums are reduced across ranks)."""
    model.eval()
    sums: dict[str, float] = {}
    counts = torch.zeros(model.cfg.n_codes, dtype=torch.float64)
    for batch in engine.shard(torch.arange(len(images))).split(batch_size):
        x = to_model_input(images[batch], norm, device)
        with autocast(device):
            out = model(x)
        recon = out.reconstruction.float()
        scores = batch_scores(norm.denormalise(x.cpu()), norm.denormalise(recon.cpu()))
        parts = {"recon": F.mse_loss(recon, x).item() * len(batch),
                 "codebook": out.codebook_loss.item() * len(batch),
                 "commitment": out.commitment_loss.item() * len(batch),
                 "ssim": sum(row["ssim"] for row in scores),
                 "psnr": sum(row["psnr"] for row in scores)}
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=model.cfg.n_codes)
    sums = engine.all_reduce_sum(sums)
    if engine.world()[1] > 1:
        torch.distributed.all_reduce(counts)
    return {**{f"val_{k}": v / len(images) for k, v in sums.items()},
            **codebook_stats_from_counts(counts)}


@torch.no_grad()
def save_reconstruction_grid(model: VQVAE, images: torch.Tensor, norm: dataset.Normalisation,
                             device: torch.device, path: Path) -> None:
    model.eval()
    x = to_model_input(images, norm, device)
    recon = norm.denormalise(model(x).reconstruction.float().cpu())[:, 0].numpy()
    original = norm.denormalise(x.cpu())[:, 0].numpy()
    save_grid([list(original), list(recon)], path, row_titles=["input", "reconstruction"])


def train_vqvae(args: argparse.Namespace, splits: dict[str, dataset.SliceSet], run: Path,
                device: torch.device) -> None:
    refuse_overwrite(run, "vqvae", args)
    cfg, settings = args.vqvae_config, args.vqvae_stage
    train_images, val_images = splits["train"].images, splits["validate"].images
    norm = dataset.compute_normalisation(train_images)
    model = VQVAE(cfg).to(device).to(memory_format=torch.channels_last)
    grid_images = val_images[torch.linspace(0, len(val_images) - 1, N_GRID_IMAGES).long()]

    def step(batch: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # crops for the whole global batch, so the RNG advances alike on every rank
        crops = random_crops(train_images[batch % len(train_images)], settings.crop, generator)
        with autocast(device):
            return vqvae_losses(stage.model, to_model_input(engine.shard(crops), norm, device),
                                settings, norm)

    def after_epoch(epoch: int, row: dict[str, float], history: list[dict[str, float]]) -> None:
        save_reconstruction_grid(model, grid_images, norm, device,
                                 run / "reconstructions" / f"epoch_{epoch:03d}.png")
        write_history(run, "vqvae", history, ["train_recon", "val_recon", "train_commitment",
                                              "val_commitment", "val_codebook"], "MSE")
        print(f"vqvae epoch {epoch}: recon {row['train_recon']:.4f}/{row['val_recon']:.4f} "
              f"val SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} "
              f"codes used {row['codebook_usage']:.1%} perplexity "
              f"{row['codebook_perplexity']:.1f} ({row['seconds']:.0f}s)", flush=True)

    stage = make_stage(
        "vqvae", model, settings, len(train_images) * settings.crops_per_image, args, device,
        step=step, monitor="val_recon", after_epoch=after_epoch,
        evaluate=lambda: evaluate_vqvae(model, val_images, norm, device, settings.batch_size),
        checkpoint_extra=lambda: {"model_config": asdict(cfg), "stage_settings": asdict(settings),
                                  "normalisation": norm.to_dict(),
                                  "data_root": str(args.data_root), "spacing": args.spacing})
    engine.fit(stage, run, args.resume)


# ---------------------------------------------------------------- encoding between the stages
def rebuild(path: Path, model_class: type, config_class: type,
            device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A model rebuilt from its checkpoint alone (config + weights), in eval mode."""
    state = load_checkpoint(path)
    model = model_class(config_class(**state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"{path} does not match its own config: {str(err).splitlines()[0]}") \
            from err
    return model.to(device).eval(), state


def load_vqvae(path: Path, device: torch.device) -> tuple[VQVAE, dataset.Normalisation, dict]:
    """The VQ-VAE of a checkpoint, with the normalisation it was trained with."""
    model, state = rebuild(path, VQVAE, VQVAEConfig, device)
    return model, dataset.Normalisation.from_dict(state["normalisation"]), state


def load_prior(path: Path, device: torch.device) -> PixelCNN:
    return rebuild(path, PixelCNN, PriorConfig, device)[0]


@torch.no_grad()
def encode_images(model: VQVAE, images: torch.Tensor, norm: dataset.Normalisation,
                  device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """uint8 (N, H, W) → int16 (N, 32, 32) code indices."""
    out = [model.image_to_indices(to_model_input(images[b], norm, device)).cpu()
           for b in torch.arange(len(images)).split(batch_size)]
    return torch.cat(out).to(torch.int16)


def encode_splits(run: Path, splits: dict[str, dataset.SliceSet],
                  device: torch.device) -> dict[str, Any]:
    """Encode every split with the best VQ-VAE and store the grids in run/indices.pt."""
    model, norm, state = load_vqvae(stage_checkpoint(run, "vqvae", "best"), device)
    indices = {"vqvae_epoch": state["epoch"], "n_codes": model.cfg.n_codes}
    for name, split in splits.items():
        indices[name] = encode_images(model, split.images, norm, device)
        indices[f"{name}_names"] = list(split.names)
    if engine.is_main():
        save_checkpoint(indices, run / "indices.pt")
        report_codebook_usage(run, {name: indices[name] for name in splits}, model.cfg.n_codes)
    return indices


def report_codebook_usage(run: Path, grids: dict[str, torch.Tensor], n_codes: int) -> None:
    """Codes used and perplexity of each split's index grids: printed, and in codebook.json."""
    stats = {name: codebook_stats(g, n_codes) for name, g in grids.items()}
    write_json(stats, run / "codebook.json")
    print(f"codebook (K = {n_codes}): " + ", ".join(
        f"{name} {row['codes_used']} used ({row['codebook_usage']:.1%}), perplexity "
        f"{row['codebook_perplexity']:.1f}" for name, row in stats.items()), flush=True)


# ------------------------------------------------------------------------ stage 2: PixelCNN
@torch.no_grad()
def evaluate_prior(model: PixelCNN, grids: torch.Tensor, device: torch.device,
                   batch_size: int) -> float:
    """Mean bits per index over a split (each rank scores its share; sums are reduced)."""
    model.eval()
    total = 0.0
    for batch in engine.shard(torch.arange(len(grids))).split(batch_size):
        with autocast(device):
            total += model.bits_per_index(grids[batch].long().to(device)).item() * len(batch)
    return engine.all_reduce_sum({"bits": total})["bits"] / len(grids)


def train_prior(args: argparse.Namespace, indices: dict[str, Any], run: Path,
                device: torch.device) -> None:
    refuse_overwrite(run, "prior", args)
    settings = args.prior_stage
    cfg = PriorConfig(**{**asdict(args.prior_config), "n_codes": indices["n_codes"]})
    train_grids, val_grids = indices["train"], indices["validate"]
    model = PixelCNN(cfg)
    if settings.embed_from_codebook:
        model.embed_like(load_checkpoint(stage_checkpoint(run, "vqvae", "best"))["model"]
                         ["quantiser.codebook"])
    model = model.to(device)

    def step(batch: torch.Tensor, _generator: torch.Generator) -> dict[str, torch.Tensor]:
        with autocast(device):
            bits = _bits(stage.model, engine.shard(train_grids[batch]).long().to(device))
        return {"loss": bits, "bits_per_index": bits.detach()}

    def after_epoch(epoch: int, row: dict[str, float], history: list[dict[str, float]]) -> None:
        write_history(run, "prior", history, ["train_bits_per_index", "val_bits_per_index"],
                      "bits per index")
        print(f"prior epoch {epoch}: bits/index {row['train_bits_per_index']:.3f}/"
              f"{row['val_bits_per_index']:.3f} ({row['seconds']:.0f}s)", flush=True)

    stage = make_stage(
        "prior", model, settings, len(train_grids), args, device, step=step,
        monitor="val_bits_per_index", after_epoch=after_epoch,
        evaluate=lambda: {"val_bits_per_index": evaluate_prior(model, val_grids, device,
                                                               settings.batch_size)},
        checkpoint_extra=lambda: {"model_config": asdict(cfg), "stage_settings": asdict(settings),
                                  "vqvae_epoch": indices["vqvae_epoch"]})
    engine.fit(stage, run, args.resume)


def _bits(model: torch.nn.Module, grids: torch.Tensor) -> torch.Tensor:
    """Bits per index through the (possibly data-parallel) model's forward."""
    return F.cross_entropy(model(grids), grids) / math.log(2)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_ROOT, help="dataset root (default: embedded demo set)")
    p.add_argument("--out", default=OUT_DIR, help="run folder for checkpoints, logs, figures")
    p.add_argument("--profile", choices=sorted(PROFILES), default=PROFILE)
    p.add_argument("--stage", choices=["vqvae", "prior", "both"], default="both")
    p.add_argument("--vqvae-epochs", type=int, default=VQVAE_EPOCHS)
    p.add_argument("--prior-epochs", type=int, default=PRIOR_EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--n-codes", type=int, default=N_CODES, help="codebook size K")
    p.add_argument("--embedding-dim", type=int, default=EMBEDDING_DIM, help="code dimension D")
    p.add_argument("--beta", type=float, default=BETA, help="commitment loss weight")
    p.add_argument("--vqvae-lr", type=float, default=VQVAE_LR)
    p.add_argument("--prior-lr", type=float, default=PRIOR_LR)
    p.add_argument("--prior-embedding", choices=["codebook", "random"], default=None,
                   help="start the prior's input embedding from the codebook (the profiles' "
                        "choice) or at random")
    p.add_argument("--spacing", type=float, default=SPACING_MM, metavar="MM",
                   help="resample volume data to MM isotropic voxels (0: keep each file's grid; "
                        "PNG slices are never resampled)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps inside an epoch (0: at epoch ends)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run's stage")
    args = p.parse_args(argv)
    if not (math.isfinite(args.spacing) and args.spacing >= 0):
        p.error("--spacing must be 0 (keep each volume's grid) or a voxel size in mm")
    apply_profile(args)
    return args


def apply_profile(args: argparse.Namespace) -> None:
    """Profile defaults, with every flag that was given taking precedence."""
    profile = PROFILES[args.profile]
    args.vqvae_config = _replace(profile["vqvae"], n_codes=args.n_codes,
                                 embedding_dim=args.embedding_dim, beta=args.beta)
    args.prior_config = profile["prior"]
    args.vqvae_stage = _replace(profile["vqvae_stage"], epochs=args.vqvae_epochs,
                                batch_size=args.batch_size, lr=args.vqvae_lr)
    embed = None if args.prior_embedding is None else args.prior_embedding == "codebook"
    args.prior_stage = _replace(profile["prior_stage"], epochs=args.prior_epochs,
                                batch_size=args.batch_size, lr=args.prior_lr,
                                embed_from_codebook=embed)


def _replace(obj: Any, **overrides: Any) -> Any:
    given = {k: v for k, v in overrides.items() if v is not None}
    return type(obj)(**{f.name: getattr(obj, f.name) for f in fields(obj)} | given)


def run_training(args: argparse.Namespace) -> Path:
    device = engine.init_distributed()
    seed_everything(args.seed)
    args.data_root = resolve_data_root(args.data)
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    splits = dataset.load_splits(args.data_root, spacing=args.spacing)
    if engine.is_main():
        print(f"data {args.data_root}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
              + f" | device {device} | processes {engine.world()[1]}")
    if args.stage in ("vqvae", "both"):
        train_vqvae(args, splits, run, device)
    indices = encode_splits(run, splits, device)
    if args.stage in ("prior", "both"):
        train_prior(args, indices, run, device)
    return run


def main(argv: list[str] | None = None) -> int:
    try:
        run = run_training(parse_args(argv))
    except (RunError, dataset.DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except engine.Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if engine.is_main():
        print(f"done: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
