"""Use a trained run: reconstruct test slices, generate new brains with the PixelCNN prior,
inpaint masked regions, and (with --evaluate) write metrics.json.

    python predict.py                        # figures for runs/demo
    python predict.py --evaluate             # and metrics.json, with a summary printed
    python predict.py --run runs/oasis --evaluate --mask my_mask.png
    python predict.py --slice-position 0.5 --n-samples 16    # brains at mid level
    python predict.py --surprise             # the prior's surprise at a synthetic lesion
    python predict.py --reconstruct-dir recon/   # every test reconstruction as 8-bit PNG
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

import dataset
from brainvq import config
from brainvq.checkpoints import CONFIG_FILE, load_indices
from brainvq.cli import script_parser
from brainvq.data.slices import DatasetError, SliceSet, evenly_spaced, relative_positions
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation import anomaly, generation, run_metrics
from brainvq.figures.run_figures import (
    figure_generated,
    figure_generated_beside_real,
    figure_generated_stack,
    figure_healing,
    figure_inpainting,
    figure_inpainting_methods,
    figure_reconstructions,
    figure_scores_by_slice,
    figure_surprise,
    spread_levels,
    write_reconstructions,
)
from brainvq.inference.masks import INPAINT_MASKS, bottom_half_mask, load_mask
from brainvq.inference.trained_run import Run
from brainvq.io_utils import RunError, write_json

# ---- Edit this, or override it with --run ------------------------------------------------------
RUN_DIR = config.DEFAULT_RUN  # e.g. "runs/oasis"
# What predict.py does by default (samples, temperature, seeds, ...) is config.PredictSettings.
# -----------------------------------------------------------------------------------------------


def evaluate(run: Run, train: SliceSet, validate: SliceSet, test: SliceSet, indices: torch.Tensor,
             reconstructions: np.ndarray, args: argparse.Namespace, out: Path) -> dict:
    """metrics.json's contents, and the figures that go with them."""
    metrics = _timed("reconstructions", run_metrics.reconstruction_metrics, run, test, indices,
                     reconstructions)
    if "per_slice_position" in metrics:
        figure_scores_by_slice(metrics["per_slice_position"], out / "ssim_by_slice.png")
    reference = _timed("position regressor", generation.real_reference, run, train, validate,
                       test, reconstructions, args.seed)
    samples, positions = generation.generated_slices(run, reference, args.n_eval_samples,
                                                     args.seed, args.temperature, args.top_p)
    metrics.update(_timed("samples", run_metrics.sample_metrics, run, samples, reconstructions))
    metrics.update(_timed("generation scores", generation.generation_scores, samples,
                          positions, reference, args.seed))
    train_grids = load_indices(run.path)["train"].long()
    metrics.update(_timed("sanity scores", generation.sanity_scores, run, reference,
                          train_grids, args.n_eval_samples, args.seed))
    metrics.update(_timed("whole-slice test", generation.whole_slice_scores, run, reference,
                          train, args.seed, args.temperature, args.top_p, train_grids))
    chosen = evenly_spaced(len(test), args.n_inpaint)
    inpainting, completions = _timed(
        "inpainting", run_metrics.inpainting_metrics, run, test.images[chosen], INPAINT_MASKS,
        args.seed, args.settings.inpaint, relative_positions(test.names)[chosen])
    metrics.update(inpainting)
    figure_inpainting_methods(completions["centre_square"], args.n_show,
                              out / "inpainting_centre_square.png")
    return metrics


def lesion_surprise(run: Run, validate: SliceSet, test: SliceSet, args: argparse.Namespace,
                    out: Path) -> dict:
    """The synthetic-lesion study: surprise and anomaly maps by healing (settings chosen on
    the validation split), surprise.json in the run, and their figures."""
    studies = {}
    for name, split in (("validate", validate), ("test", test)):
        chosen = evenly_spaced(len(split), args.n_surprise)
        studies[name] = _timed(f"surprise ({name})", anomaly.lesion_study, run,
                               split.images[chosen], args.seed,
                               relative_positions(split.names)[chosen])
    study = studies["test"]
    figure_surprise(study, min(args.n_show, 4), out / "surprise.png")
    healing, maps = _timed("healing", anomaly.healing_metrics, run, study,
                           studies["validate"], args.seed)
    figure_healing(study, maps, min(args.n_show, 4), out / "healing.png")
    metrics = {**anomaly.surprise_metrics(study), **healing}
    write_json(metrics, run.path / "surprise.json")
    return metrics


T = TypeVar("T")


def _timed(what: str, function: Callable[..., T], *args: Any) -> T:
    start = time.time()
    result = function(*args)
    print(f"{what}: {time.time() - start:.1f}s", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = config.PredictSettings()
    p = script_parser(__doc__)
    p.add_argument("--run", default=RUN_DIR, help="run folder written by train.py")
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--evaluate", action="store_true", help="write metrics.json in the run")
    p.add_argument("--mask", type=Path, help="inpainting mask: PNG/.npy, 32×32 or 256×256")
    p.add_argument("--reconstruct-dir", type=Path,
                   help="write every test reconstruction there as an 8-bit PNG, named as its "
                        "input")
    p.add_argument("--surprise", action="store_true",
                   help="surprise and anomaly maps (by healing) of slices with a synthetic "
                        "lesion: figures/surprise.png, figures/healing.png, surprise.json")
    p.add_argument("--n-show", type=int, default=d.n_show,
                   help="test images in the reconstruction and inpainting figures")
    p.add_argument("--n-samples", type=int, default=d.n_samples,
                   help="brains generated from scratch")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature of generated brains")
    p.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                   help="nucleus sampling of generated brains: each site drawn from its "
                        "likeliest codes that hold P of the probability (1: all codes)")
    p.add_argument("--inpaint-temperature", type=float, default=d.inpaint_temperature,
                   help="sampling temperature of inpainted fills (chosen on validation by "
                        "choose_temperature.py --task inpainting)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--slice-position", type=float, default=d.slice_position, metavar="P",
                   help="generate brains at relative slice position P (0: lowest slice of a "
                        "volume, 1: highest; default: spread from bottom to top)")
    p.add_argument("--sampler", choices=["fast", "naive"], default=d.sampler,
                   help="PixelCNN sampler: cached (fast) or a forward pass per site (naive, "
                        "the reference); both give the same grids")
    p.add_argument("--n-eval-samples", type=int, default=d.n_eval_samples,
                   help="generated brains scored for realism, memorisation and diversity")
    p.add_argument("--n-inpaint", type=int, default=d.n_inpaint,
                   help="test images inpainted for the inpainting metrics")
    p.add_argument("--inpaint-candidates", type=int, default=d.inpaint_candidates,
                   help="full-context inpainting: particles drawn per image (raster fills "
                        "resampled by the given context), of which the one the prior finds "
                        "likeliest given the whole grid is kept")
    p.add_argument("--gibbs-sweeps", type=int, default=d.gibbs_sweeps,
                   help="full-context inpainting: Gibbs sweeps over the masked sites after "
                        "that choice")
    p.add_argument("--gibbs-proposals", type=int, default=d.gibbs_proposals,
                   help="full-context inpainting: codes drawn per site and update")
    p.add_argument("--n-surprise", type=int, default=d.n_surprise,
                   help="test (and validation) slices that get a lesion for --surprise")
    args = p.parse_args(argv)
    for flag in ("n_eval_samples", "n_inpaint", "inpaint_candidates", "gibbs_proposals",
                 "n_surprise"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("temperature", "inpaint_temperature"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must lie in (0, 1]")
    if args.slice_position is not None and not 0 <= args.slice_position <= 1:
        p.error("--slice-position must lie in [0, 1]")
    args.settings = config.PredictSettings(
        **{f.name: getattr(args, f.name) for f in fields(config.PredictSettings)})
    return args


def report_settings(run: Path, settings: config.PredictSettings) -> None:
    """Print each setting that differs from its preset: the run's (config.json) and this
    command's own flags."""
    saved = run / CONFIG_FILE
    if saved.is_file():
        run_config = json.loads(saved.read_text())
        for key, (value, preset) in config.differences(run_config, run_config["profile"]).items():
            print(f"{key} = {value} (set when training; preset {run_config['profile']!r}: "
                  f"{preset})")
    defaults = config.PredictSettings()
    for name, value in asdict(settings).items():
        if value != getattr(defaults, name):
            print(f"{name} = {value} (--{name.replace('_', '-')}; default "
                  f"{getattr(defaults, name)})")


def generation_positions(n: int, position: float | None) -> torch.Tensor:
    """(n,) relative slice positions: all at `position`, or spread from bottom to top."""
    if position is not None:
        return torch.full((n,), position)
    return torch.linspace(0, 1, n + 2)[1:-1]  # the inner levels: the ends are near-empty tips


def run_predict(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    run = Run(Path(args.run), choose_device(args.device), args.sampler)
    report_settings(run.path, args.settings)
    root = Path(args.data) if args.data else run.data_root
    # train: the position regressor; validate: real-vs-real scores and the healing's settings
    wanted = ("train", "validate", "test") if args.evaluate else \
        ("validate", "test") if args.surprise else ("test",)
    splits = dataset.load_splits(root, splits=wanted, spacing=run.spacing)
    test = splits["test"]
    out = run.path / "figures"
    shown = evenly_spaced(len(test), args.n_show)
    show, show_positions = test.images[shown], relative_positions(test.names)[shown]
    figure_reconstructions(run, show, out)
    figure_generated(run, generation_positions(args.n_samples, args.slice_position),
                     args.temperature, args.seed, out, args.top_p)
    figure_generated_stack(run, args.temperature, args.seed, out / "generated_stack.png",
                           top_p=args.top_p)
    figure_inpainting(run, show, show_positions, bottom_half_mask(), args.seed,
                      args.settings.inpaint, out / "inpainting_bottom_half.png")
    if args.mask:
        mask = load_mask(args.mask, run.vqvae.cfg.n_codes)
        figure_inpainting(run, show, show_positions, mask, args.seed, args.settings.inpaint,
                          out / "inpainting_custom.png")
    if args.evaluate or args.reconstruct_dir:
        indices = run.encode(test.images)
        reconstructions = run.decode(indices)
    if args.reconstruct_dir:
        write_reconstructions(test.names, reconstructions, args.reconstruct_dir)
    metrics = (evaluate(run, splits["train"], splits["validate"], test, indices,
                        reconstructions, args, out) if args.evaluate else {})
    if args.surprise:
        metrics.update(lesion_surprise(run, splits["validate"], test, args, out))
    # after the metrics, so that no number depends on whether this figure is drawn
    positions = relative_positions(test.names)
    levels = spread_levels(positions)
    figure_generated_beside_real(run, test.images[levels], positions[levels], args.temperature,
                                 args.seed, out / "generated_vs_real.png", args.top_p)
    print(f"figures in {out}")
    if args.evaluate:
        write_json(metrics, run.path / "metrics.json")
    if metrics:
        written = run.path / ("metrics.json" if args.evaluate else "surprise.json")
        print("\n".join(run_metrics.summary(metrics, written)))
    return run.path


def main(argv: list[str] | None = None) -> int:
    try:
        run_predict(parse_args(argv))
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
