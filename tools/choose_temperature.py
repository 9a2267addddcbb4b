"""Choose a sampling temperature of a run's prior on the validation split, for one task:

- generation (default): for each temperature and seed, generate brains at the validation
  slices' levels and score them against VQ-VAE reconstructions of the validation slices
  (generation.py's two-sample test and Fréchet distance); the best has the lowest mean
  two-sample accuracy. The same samples' scores against the test slices are printed
  beside them, for reading, not for choosing. Writes RUN/temperature.json; pass the chosen
  value to predict.py with --temperature.
- inpainting: for each temperature and seed, inpaint the centre square of validation slices
  (and, for reading, of test slices) as predict.py does; the best has the highest mean SSIM
  of the full-context fills in the hole. Writes RUN/inpaint_temperature.json;
  pass the chosen value with --inpaint-temperature.

Either way, of the temperatures within the seeds' noise of the best one, the one closest to 1.0
(the prior's own distribution) is chosen. For generation, `--top-p` adds nuclei: each temperature
is scored with each, and the tie goes to the setting nearest the prior's own distribution
(|temperature − 1| + 1 − top-p); pass the chosen one to predict.py with --top-p.

    python -m tools.choose_temperature --run runs/demo --temperatures 0.9 1.0 --seeds 0 1 2
    python -m tools.choose_temperature --run runs/demo --temperatures 1.0 --top-p 0.9 0.95 1.0
    python -m tools.choose_temperature --run runs/demo --task inpainting --temperatures 0.6 1.0
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from brainvq.cli import script_parser
from brainvq.config import DEFAULT_RUN, PredictSettings
from brainvq.data.slices import DatasetError, SliceSet, evenly_spaced, relative_positions
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation import generation
from brainvq.evaluation.run_metrics import INPAINT_METHODS, inpainting_metrics
from brainvq.inference.masks import INPAINT_MASKS
from brainvq.inference.trained_run import Run
from brainvq.io_utils import RunError, write_json
from dataset import load_splits

SCORES = ("c2st_accuracy", "sample_fd", "sample_position_mae")
FILLS = INPAINT_METHODS[1:]  # every fill: the reconstruction needs no prior
INPAINT_SCORES = tuple(f"{fill}_ssim" for fill in FILLS)


def validation_side(reference: generation.RealReference) -> generation.RealReference:
    """The reference with the validation slices as its real side."""
    return replace(reference, reconstructions=reference.other, cases=reference.other_cases,
                   positions=reference.other_positions)


def setting_key(temperature: float, top_p: float = 1.0) -> str:
    """The results' key of a sampling setting: the temperature, and the nucleus if any."""
    return str(temperature) if top_p >= 1.0 else f"{temperature} top-p {top_p}"


def parse_setting(key: str) -> tuple[float, float]:
    """`setting_key`'s inverse: (temperature, top_p)."""
    temperature, _, top_p = key.partition(" top-p ")
    return float(temperature), float(top_p) if top_p else 1.0


def score_temperatures(run: Run, reference: generation.RealReference,
                       temperatures: list[float], seeds: list[int], n: int,
                       top_ps: tuple[float, ...] = (1.0,)) -> dict:
    """{setting_key: {side: {score: [one value per seed]}}} for side in validate, test, for
    each temperature with each nucleus `top_ps`."""
    sides = {"validate": validation_side(reference), "test": reference}
    results: dict = {}
    for temperature in temperatures:
        for top_p in top_ps:
            key = setting_key(temperature, top_p)
            scores = {side: {name: [] for name in SCORES} for side in sides}
            for seed in seeds:  # at the validation slices' levels
                samples, positions = generation.generated_slices(run, sides["validate"], n, seed,
                                                                 temperature, top_p)
                for side, real in sides.items():
                    for name, value in generation.generation_scores(samples, positions, real,
                                                                    seed).items():
                        scores[side][name].append(value)
                print(f"temperature {key} seed {seed}: " + ", ".join(
                    f"{side} c2st {scores[side]['c2st_accuracy'][-1]:.3f}" for side in sides),
                    flush=True)
            results[key] = scores
    return results


def score_inpainting_temperatures(run: Run, sides: dict[str, SliceSet],
                                  temperatures: list[float], seeds: list[int],
                                  n: int) -> dict:
    """{temperature: {side: {score: [one value per seed]}}}: SSIM in the centre square of `n`
    slices of each side, for each fill of `evaluation.inpainting_metrics` at that temperature
    (the other inpainting settings as predict.py's defaults)."""
    defaults = PredictSettings().inpaint
    mask = {"centre_square": INPAINT_MASKS["centre_square"]}
    picked = {}  # side → (images, their relative slice positions)
    for side, slices in sides.items():
        chosen = evenly_spaced(len(slices), n)
        picked[side] = slices.images[chosen], relative_positions(slices.names)[chosen]
    results: dict = {}
    for temperature in temperatures:
        settings = replace(defaults, temperature=temperature)
        scores = {side: {name: [] for name in INPAINT_SCORES} for side in sides}
        for seed in seeds:
            for side, (images, positions) in picked.items():
                metrics, _ = inpainting_metrics(run, images, mask, seed, settings, positions)
                for fill in FILLS:
                    scores[side][f"{fill}_ssim"].append(
                        metrics[f"inpaint_centre_square_{fill}_ssim"])
            print(f"temperature {temperature} seed {seed}: " + ", ".join(
                f"{side} full {scores[side]['full_ssim'][-1]:.3f}" for side in sides),
                flush=True)
        results[str(temperature)] = scores
    return results


def chosen_setting(results: dict, score: str = "c2st_accuracy",
                   higher_is_better: bool = False) -> tuple[float, float]:
    """Of the settings (temperature, top-p) whose mean validation `score` the seeds cannot tell
    from the best one (by default the best: whose samples the two-sample test tells apart
    least), the one closest to the prior's own distribution (temperature 1, no nucleus). A
    setting counts as worse only where its mean is worse by more than two standard errors of
    the difference between the means over the seeds."""
    sign = -1.0 if higher_is_better else 1.0  # as costs: lower is better
    cost = {parse_setting(key): sign * np.asarray(sides["validate"][score])
            for key, sides in results.items()}
    best = min(cost, key=lambda s: cost[s].mean())
    tied = [s for s in cost if cost[s].mean() - cost[best].mean()
            <= 2 * _standard_error(cost[s], cost[best])]
    return min(tied, key=lambda s: abs(s[0] - 1.0) + 1.0 - s[1])


def chosen_temperature(results: dict, score: str = "c2st_accuracy",
                       higher_is_better: bool = False) -> float:
    """`chosen_setting`'s temperature."""
    return chosen_setting(results, score, higher_is_better)[0]


def _standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """Of the difference between the means of two sets of per-seed scores (0 for one seed)."""
    if min(len(a), len(b)) < 2:
        return 0.0
    return float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def print_table(results: dict, names: tuple[str, ...]) -> None:
    print("| temperature | side | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for temperature, sides in results.items():
        for side, scores in sides.items():
            cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–"
                     for v in (scores[name] for name in names)]
            print(f"| {temperature} | {side} | " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, prog="python -m tools.choose_temperature")
    p.add_argument("--run", default=DEFAULT_RUN, help="run folder written by train.py")
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--task", choices=["generation", "inpainting"], default="generation")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.9, 1.0])
    p.add_argument("--top-p", type=float, nargs="+", default=[1.0], dest="top_ps",
                   help="generation: nuclei to score with each temperature (1: none)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=64,
                   help="generation: brains generated per seed")
    p.add_argument("--n-inpaint", type=int, default=32,
                   help="inpainting: slices of each split inpainted per seed")
    args = p.parse_args(argv)
    if min(args.temperatures) <= 0:
        p.error("--temperatures must be positive")
    if not all(0 < top_p <= 1 for top_p in args.top_ps):
        p.error("--top-p must lie in (0, 1]")
    if args.task == "inpainting" and args.top_ps != [1.0]:
        p.error("--top-p is for generation; inpainting draws from the whole distribution")
    if args.n_samples < 2:
        p.error("--n-samples must be at least 2")
    if args.n_inpaint < 1:
        p.error("--n-inpaint must be at least 1")
    return args


def choose_for_generation(run: Run, splits: dict[str, SliceSet],
                          args: argparse.Namespace) -> None:
    test = splits["test"]
    reference = generation.real_reference(
        run, splits["train"], splits["validate"], test, run.decode(run.encode(test.images)),
        seed=0)
    results = score_temperatures(run, reference, args.temperatures, args.seeds, args.n_samples,
                                 tuple(args.top_ps))
    print_table(results, SCORES)
    chosen, top_p = chosen_setting(results)
    print(f"chosen on validation: temperature {chosen}, top-p {top_p}")
    write_json({"chosen": chosen, "chosen_top_p": top_p, "seeds": args.seeds,
                "n_samples": args.n_samples, "scores": results}, run.path / "temperature.json")


def choose_for_inpainting(run: Run, splits: dict[str, SliceSet],
                          args: argparse.Namespace) -> None:
    results = score_inpainting_temperatures(run, splits, args.temperatures, args.seeds,
                                            args.n_inpaint)
    print_table(results, INPAINT_SCORES)
    chosen = chosen_temperature(results, "full_ssim", higher_is_better=True)
    print(f"chosen on validation: inpainting temperature {chosen}")
    write_json({"chosen": chosen, "seeds": args.seeds, "n_inpaint": args.n_inpaint,
                "mask": "centre_square", "scores": results},
               run.path / "inpaint_temperature.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generating = args.task == "generation"
    try:
        run = Run(Path(args.run), choose_device(args.device))
        splits = load_splits(Path(args.data) if args.data else run.data_root,
                             splits=("train", "validate", "test") if generating
                             else ("validate", "test"), spacing=run.spacing)
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (choose_for_generation if generating else choose_for_inpainting)(run, splits, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
