"""Compare a run's PixelCNN prior with a seed-style prior (indices fed as a scaled scalar,
seven gated layers with dilations 1,2,1,4,1,2,1) trained for the same number of epochs on the
same index grids, by bits per index on the test split; and, as an ablation, with the same
PixelCNN trained without starting its embedding from the codebook. Writes
RUN/prior_comparison.json.

    python compare_priors.py --run runs/demo
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import engine
from baselines import SeedStylePixelCNN
from checkpoints import checkpoint_path, load_indices, load_prior
from config import StageSettings
from distributed import DEVICES, choose_device
from inference import autocast, evaluate_prior
from io_utils import RunError, load_checkpoint, write_json
from modules import PixelCNN
from stages import RunOptions, make_stage, seed_everything


def train_alone(name: str, model: PixelCNN, indices: dict, settings: StageSettings, seed: int,
                device: torch.device) -> tuple[PixelCNN, float]:
    """Train a comparison prior with train.py's loop and settings; returns its
    best-validation weights and the seconds taken."""
    model = model.to(device)
    grids = indices["train"]

    def step(batch: torch.Tensor, _generator: torch.Generator) -> dict[str, torch.Tensor]:
        with autocast(device):
            return {"loss": model.bits_per_index(grids[batch].long().to(device))}

    def report(epoch: int, row: dict[str, float], _history: list) -> None:
        print(f"{name} epoch {epoch}: validation bits/index "
              f"{row['val_bits_per_index']:.3f}", flush=True)

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        stage = make_stage(
            name, model, settings, len(grids), RunOptions(Path(scratch), seed), device, step=step,
            monitor="val_bits_per_index", after_epoch=report, checkpoint_extra=dict,
            evaluate=lambda: {"val_bits_per_index": evaluate_prior(
                model, indices["validate"], device, settings.batch_size)})
        engine.fit(stage, Path(scratch), resume=False)
        model.load_state_dict(load_checkpoint(checkpoint_path(Path(scratch), name, "best"))
                              ["model"])
    return model, time.time() - started


def compare(run: Path, args: argparse.Namespace) -> dict:
    device = choose_device(args.device)
    indices = load_indices(run)
    state = load_checkpoint(checkpoint_path(run, "prior", "best"))
    stage = StageSettings(**state["stage_settings"])
    ours = load_prior(checkpoint_path(run, "prior", "best"), device)
    seed_everything(args.seed)
    baseline, seconds = train_alone("seed_style_prior",
                                    SeedStylePixelCNN(indices["n_codes"], ours.cfg.channels),
                                    indices, stage, args.seed, device)
    result = {
        "epochs": stage.epochs,
        "test_bits_per_index_ours": evaluate_prior(ours, indices["test"], device,
                                                   stage.batch_size),
        "test_bits_per_index_seed_style": evaluate_prior(baseline, indices["test"], device,
                                                         stage.batch_size),
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_seed_style": sum(p.numel() for p in baseline.parameters()),
        "seed_style_train_seconds": seconds,
    }
    result["reduction"] = 1 - result["test_bits_per_index_ours"] / result[
        "test_bits_per_index_seed_style"]
    if stage.embed_from_codebook and not args.no_ablation:
        seed_everything(args.seed)
        plain, _ = train_alone("prior_random_embedding", PixelCNN(ours.cfg), indices, stage,
                               args.seed, device)
        result["test_bits_per_index_ours_random_embedding"] = evaluate_prior(
            plain, indices["test"], device, stage.batch_size)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ablation", action="store_true",
                   help="skip training the run's prior without its codebook-started embedding")
    p.add_argument("--device", choices=DEVICES, default="auto")
    args = p.parse_args(argv)
    try:
        result = compare(args.run, args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(result, args.run / "prior_comparison.json")
    print(f"test bits/index after {result['epochs']} epochs: ours "
          f"{result['test_bits_per_index_ours']:.3f}, seed-style "
          f"{result['test_bits_per_index_seed_style']:.3f} "
          f"({result['reduction']:.1%} fewer bits)")
    if "test_bits_per_index_ours_random_embedding" in result:
        print(f"ablation: ours with a randomly started embedding "
              f"{result['test_bits_per_index_ours_random_embedding']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
