"""Train the VQ-VAE (stage 1), encode every split to code indices once, train its decoder on
alone from those frozen indices (stage 1b), then the gated PixelCNN prior on them (stage 2).
Settings come from a preset (brainvq/config.py) that the flags below override; the run folder
keeps them in config.json and in every checkpoint.

    python train.py                          # demo: the embedded MNI152-derived slices
    python train.py --data /path/to/OASIS --out runs/oasis --profile full
    python train.py --data /path/to/volumes --spacing 1.0 --out runs/volumes
    python train.py --out runs/oasis --resume          # continue an interrupted run
    python train.py --out runs/oasis --stage prior --overwrite --prior-epochs 20
    python train.py --out runs/oasis --stage decoder --overwrite --decoder-epochs 4
    torchrun --nproc_per_node=4 train.py --data /path/to/OASIS --profile full
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import dataset
from brainvq import config
from brainvq.checkpoints import CONFIG_FILE, STAGES
from brainvq.cli import script_parser
from brainvq.data.demo import build_demo_dataset, demo_root
from brainvq.data.slices import DatasetError
from brainvq.data.volumes import VOLUME_SPACING_MM
from brainvq.distributed import DEVICES, init_distributed, is_main, leave_distributed, world
from brainvq.io_utils import RunError
from brainvq.training import engine, stages

# the stages each --stage runs, in this order
STAGES_OF = {"all": STAGES, "both": STAGES, "vqvae": ("vqvae", "decoder"),
             "decoder": ("decoder",), "prior": ("prior",)}

# ---- Edit these, or override them with --data and --out ---------------------------------------
DATA_ROOT: str | None = None  # None: the embedded demo set (real MNI152 MRI), built on first use
OUT_DIR = config.DEFAULT_RUN  # e.g. "runs/oasis"
# Every other setting comes from a preset in config.py (--profile) and the flags below.
# -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--data", default=DATA_ROOT, help="dataset root (default: embedded demo set)")
    p.add_argument("--out", default=OUT_DIR, help="run folder for checkpoints, logs, figures")
    p.add_argument("--profile", choices=sorted(config.PROFILES), default=config.DEFAULT_PROFILE,
                   help="preset (config.py): 'demo' for a 2-core CPU, 'full' for a GPU and "
                        "OASIS, 'tiny' for a seconds-long smoke test")
    p.add_argument("--stage", choices=sorted(STAGES_OF), default="all",
                   help="all (or both): every stage; vqvae: the VQ-VAE and its decoder's "
                        "refinement; decoder: only that refinement; prior: only the prior "
                        "(each reuses what the run holds of the others)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    override = p.add_argument_group("overrides of the preset")
    override.add_argument("--vqvae-epochs", type=int)
    override.add_argument("--decoder-epochs", type=int,
                          help="epochs of the decoder alone on the frozen code (0: none)")
    override.add_argument("--prior-epochs", type=int)
    override.add_argument("--batch-size", type=int,
                          help="the VQ-VAE's and the prior's global batch")
    override.add_argument("--n-codes", type=int, help="codebook size K")
    override.add_argument("--embedding-dim", type=int, help="code dimension D")
    override.add_argument("--beta", type=float, help="commitment loss weight")
    override.add_argument("--vqvae-widths", type=int, nargs=3, metavar="C",
                          help="the VQ-VAE's widths after each stride-2 stage (256→128→64→32)")
    override.add_argument("--res-blocks", type=int,
                          help="residual blocks at the 32×32 level, in encoder and decoder each")
    override.add_argument("--ssim-weight", type=float,
                          help="weight of the VQ-VAE's (1 − SSIM) loss term")
    override.add_argument("--vqvae-lr", type=float)
    override.add_argument("--vqvae-lr-decay", choices=config.LR_DECAYS,
                          help="the VQ-VAE's learning rate after its warm-up, down to zero")
    override.add_argument("--prior-lr", type=float)
    override.add_argument("--prior-lr-decay", choices=config.LR_DECAYS,
                          help="the prior's learning rate after its warm-up, down to zero")
    override.add_argument("--prior-channels", type=int, help="the prior's width C")
    override.add_argument("--prior-mirror", action=argparse.BooleanOptionalAction,
                          help="also train the prior on the mirror image of every training "
                               "slice (twice the grids per epoch; the demo and full presets do)")
    override.add_argument("--prior-embedding", choices=["codebook", "random"],
                          help="start the prior's input embedding from the codebook (the "
                               "presets' choice) or at random")
    p.add_argument("--spacing", type=float, default=VOLUME_SPACING_MM, metavar="MM",
                   help="resample volume data to MM isotropic voxels (0: keep each file's grid; "
                        "PNG slices are never resampled)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also checkpoint every N steps inside an epoch (0: at epoch ends)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run's stage")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models for training (minutes of compiling first; "
                        "meant for long GPU runs, slower on a CPU)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.spacing) and args.spacing >= 0):
        p.error("--spacing must be 0 (keep each volume's grid) or a voxel size in mm")
    return args


def resolve_profile(args: argparse.Namespace) -> config.Profile:
    """The preset with every override flag that was given."""
    embed = None if args.prior_embedding is None else args.prior_embedding == "codebook"
    flags = {flag: getattr(args, flag) for flag in config.FLAG_FIELDS
             if flag != "embed_from_codebook"}
    return config.resolve(args.profile, {**flags, "embed_from_codebook": embed})


def run_training(args: argparse.Namespace) -> Path:
    device = init_distributed(args.device)
    stages.seed_everything(args.seed)
    data_root = Path(args.data).expanduser() if args.data else build_demo_dataset(demo_root())
    profile = resolve_profile(args)
    options = stages.RunOptions(run=Path(args.out), seed=args.seed, resume=args.resume,
                                overwrite=args.overwrite,
                                checkpoint_every=args.checkpoint_every,
                                compile=args.compile)
    options.run.mkdir(parents=True, exist_ok=True)
    todo = STAGES_OF[args.stage]
    for stage in todo if args.resume else ():
        stages.refuse_other_schedule(options.run, stage, getattr(profile, f"{stage}_stage"))
    splits = dataset.load_splits(data_root, spacing=args.spacing)
    data = {"data_root": str(data_root), "spacing": args.spacing}
    if is_main():
        print(f"data {data_root}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
              + f" | device {device} | processes {world()[1]}")
        config.write_run_config(options.run / CONFIG_FILE, args.profile, profile,
                                {**data, "seed": args.seed, "device": str(device),
                                 "compile": args.compile})
    if "vqvae" in todo:
        stages.train_vqvae(profile.vqvae, profile.vqvae_stage, splits, options, device, data)
    indices = stages.encode_splits(options.run, splits, device, profile.prior_stage.mirror)
    if "decoder" in todo and profile.decoder_stage.epochs:
        stages.train_decoder(profile.decoder_stage, splits, indices, options, device)
    if "prior" in todo:
        stages.train_prior(profile.prior, profile.prior_stage, indices, options, device)
    return options.run


def main(argv: list[str] | None = None) -> int:
    try:
        run = run_training(parse_args(argv))
        main_rank = is_main()
        leave_distributed()
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except engine.Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if main_rank:
        print(f"done: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
