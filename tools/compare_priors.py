"""Compare a run's PixelCNN prior with a seed-style prior (indices fed as a scaled scalar,
seven gated layers with dilations 1,2,1,4,1,2,1) trained for the same number of epochs on the
same index grids, by bits per index on the test split and by how real its samples are
(generation.py's scores, the texture test's included); and, as an ablation, with the same
PixelCNN trained without starting its embedding from the codebook. Writes RUN/prior_comparison.json.

    python -m tools.compare_priors --run runs/demo
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from brainvq.checkpoints import checkpoint_path, load_indices, load_prior, split_positions
from brainvq.cli import script_parser
from brainvq.config import DEFAULT_RUN, StageSettings
from brainvq.data.slices import to_uint8
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation import generation
from brainvq.evaluation.baselines import SeedStylePixelCNN
from brainvq.inference.trained_run import Run, autocast, draw, evaluate_prior
from brainvq.io_utils import RunError, load_checkpoint, write_json
from brainvq.positions import unknown_positions
from brainvq.training import engine
from brainvq.training.stages import (
    RunOptions,
    make_stage,
    place_prior,
    seed_everything,
)
from dataset import load_splits
from modules import PixelCNN


def train_alone(name: str, model: PixelCNN, indices: dict, settings: StageSettings, seed: int,
                device: torch.device) -> tuple[PixelCNN, float]:
    """Train a comparison prior with train.py's loop and settings; returns its
    best-validation weights and the seconds taken."""
    model = place_prior(model, device)
    grids, positions = indices["train"], split_positions(indices, "train")

    def step(_trained: torch.nn.Module, batch: torch.Tensor,
             _generator: torch.Generator) -> dict[str, torch.Tensor]:
        with autocast(device):
            return {"loss": model.bits_per_index(grids[batch].long().to(device),
                                                 positions[batch].to(device))}

    def report(epoch: int, row: dict[str, float], _history: list) -> None:
        print(f"{name} epoch {epoch}: validation bits/index "
              f"{row['val_bits_per_index']:.3f}", flush=True)

    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        stage = make_stage(
            name, model, settings, len(grids), RunOptions(Path(scratch), seed), device, step=step,
            monitor="val_bits_per_index", after_epoch=report, checkpoint_extra=dict,
            evaluate=lambda: {"val_bits_per_index": evaluate_prior(
                model, indices["validate"], device, settings.batch_size,
                split_positions(indices, "validate"))})
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
    test_positions = split_positions(indices, "test")
    result = {
        "epochs": stage.epochs,
        "test_bits_per_index_ours": evaluate_prior(ours, indices["test"], device,
                                                   stage.batch_size, test_positions),
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
            plain, indices["test"], device, stage.batch_size, test_positions)
    if args.n_samples:
        result.update(seed_style_sample_scores(run, baseline, indices, args, device))
    return result


def seed_style_sample_scores(run: Path, baseline: PixelCNN, indices: dict,
                             args: argparse.Namespace, device: torch.device) -> dict:
    """generation.py's scores of the seed-style prior's samples (decoded by the run's VQ-VAE),
    against the same real reference `predict.py --evaluate` uses."""
    trained = Run(run, device)
    splits = load_splits(trained.data_root, spacing=trained.spacing)
    test_grids = indices["test"].long()
    reference = generation.real_reference(trained, splits["train"], splits["validate"],
                                          splits["test"], trained.decode(test_grids),
                                          args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    grids = draw(baseline.eval(), torch.full((args.n_samples, 32, 32), -1, device=device), 1.0,
                 generator).cpu()
    unknown = unknown_positions(args.n_samples)  # the seed's prior knows no position
    samples = to_uint8(trained.decode(grids))
    scores = generation.generation_scores(samples, unknown, reference, args.seed)
    scores["texture_c2st"] = generation.texture_c2st(samples, reference, args.seed)
    return {f"seed_style_{key}": value for key, value in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.compare_priors")
    p.add_argument("--run", default=DEFAULT_RUN, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ablation", action="store_true",
                   help="skip training the run's prior without its codebook-started embedding")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--n-samples", type=int, default=64,
                   help="seed-style samples scored for realism (0: skip)")
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
    if "seed_style_c2st_accuracy" in result:
        print(f"seed-style samples: c2st accuracy {result['seed_style_c2st_accuracy']:.3f}, "
              f"on texture {result['seed_style_texture_c2st']:.3f} "
              "(0.5: indistinguishable from real)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
