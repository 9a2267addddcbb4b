"""Choose the sampling temperature of a run's prior on the validation split: for each
temperature and seed, generate brains at the validation slices' levels and score them against
VQ-VAE reconstructions of the validation slices (generation.py's two-sample test and Fréchet
distance); the temperature with the lowest mean two-sample accuracy is chosen where it beats
1.0 by more than the seeds' noise. The same samples' scores against the test slices are printed
beside them, for reading, not for choosing. Writes
RUN/temperature.json; pass the chosen value to predict.py with --temperature.

    python choose_temperature.py --run runs/demo --temperatures 0.9 1.0 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import generation
from dataset import load_splits
from distributed import DEVICES, choose_device
from evaluation import to_uint8
from inference import Run
from io_utils import RunError, write_json
from slices import DatasetError

SCORES = ("c2st_accuracy", "sample_fd", "sample_position_mae")


def validation_side(reference: generation.RealReference) -> generation.RealReference:
    """The reference with the validation slices as its real side."""
    return replace(reference, reconstructions=reference.other, cases=reference.other_cases,
                   positions=reference.other_positions)


def score_temperatures(run: Run, reference: generation.RealReference,
                       temperatures: list[float], seeds: list[int], n: int) -> dict:
    """{temperature: {side: {score: [one value per seed]}}} for side in validate, test."""
    sides = {"validate": validation_side(reference), "test": reference}
    results: dict = {}
    for temperature in temperatures:
        scores = {side: {name: [] for name in SCORES} for side in sides}
        for seed in seeds:
            positions = generation.sample_positions(sides["validate"], n, seed)
            grids = run.sample(torch.full((n, 32, 32), -1), temperature, seed, positions)
            samples = to_uint8(run.decode(grids))
            for side, real in sides.items():
                for name, value in generation.generation_scores(samples, positions, real,
                                                                seed).items():
                    scores[side][name].append(value)
            print(f"temperature {temperature} seed {seed}: " + ", ".join(
                f"{side} c2st {scores[side]['c2st_accuracy'][-1]:.3f}" for side in sides),
                flush=True)
        results[str(temperature)] = scores
    return results


def chosen_temperature(results: dict) -> float:
    """The temperature whose samples the validation two-sample test tells apart least; but
    1.0, the prior's own distribution, unless that one beats it by more than two standard
    errors of the difference between their means over the seeds."""
    accuracy = {float(t): np.asarray(sides["validate"]["c2st_accuracy"])
                for t, sides in results.items()}
    best = min(accuracy, key=lambda t: accuracy[t].mean())
    if 1.0 not in accuracy or best == 1.0:
        return best
    a, b = accuracy[best], accuracy[1.0]
    standard_error = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) \
        if min(len(a), len(b)) > 1 else 0.0
    return best if b.mean() - a.mean() > 2 * standard_error else 1.0


def print_table(results: dict) -> None:
    print("| temperature | side | " + " | ".join(SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for temperature, sides in results.items():
        for side, scores in sides.items():
            cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–"
                     for v in (scores[name] for name in SCORES)]
            print(f"| {temperature} | {side} | " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="run folder written by train.py")
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.9, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=64, help="generated brains per seed")
    args = p.parse_args(argv)
    if min(args.temperatures) <= 0:
        p.error("--temperatures must be positive")
    if args.n_samples < 2:
        p.error("--n-samples must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = Run(Path(args.run), choose_device(args.device))
        splits = load_splits(Path(args.data) if args.data else run.data_root,
                             spacing=run.spacing)
        test = splits["test"]
        reference = generation.real_reference(
            run, splits["train"], splits["validate"], test, run.decode(run.encode(test.images)),
            seed=0)
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = score_temperatures(run, reference, args.temperatures, args.seeds, args.n_samples)
    print_table(results)
    chosen = chosen_temperature(results)
    print(f"chosen on validation: temperature {chosen}")
    write_json({"chosen": chosen, "seeds": args.seeds, "n_samples": args.n_samples,
                "scores": results}, Path(args.run) / "temperature.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
