"""How real are the generated brains as whole slices? The whole-slice test of metrics.json
(`generation.whole_slice_scores`: 128² slices beside their left-right difference, a classifier
on the frozen convolutions of a position regressor trained on the training split) for several
seeds, each beside its sanity cases: real against real (≈ 0.5), unigram slices and chimeras
(≈ 1). The brains are generated at every slice's level of one held-out split (`--side`: test,
as in metrics.json, or validate, to compare runs without looking at the test split), against
that split's reconstructions; the other held-out split gives the chimeras' halves. Writes
RUN/slice_test_SIDE.json.

    python -m tools.slice_test --run runs/demo --seeds 0 1 2 3 4
    python -m tools.slice_test --run runs/demo --side validate --seeds 0 1 2
"""
from __future__ import annotations

import sys
from pathlib import Path

from brainvq.checkpoints import load_indices
from brainvq.cli import print_seed_table, scores_over_seeds, script_parser
from brainvq.config import DEFAULT_RUN, PredictSettings
from brainvq.data.slices import DatasetError, SliceSet
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation import generation
from brainvq.inference.trained_run import Run
from brainvq.io_utils import RunError, write_json
from dataset import load_splits

CASES = ("slice_c2st_real_vs_real", "slice_c2st", "slice_c2st_unigram", "slice_c2st_chimera")


def score_seeds(run: Run, splits: dict[str, SliceSet], side: str,
                seeds: list[int]) -> dict[str, list[float]]:
    """{score: one value per seed}, the brains scored against the `side` split."""
    other = "validate" if side == "test" else "test"
    real = splits[side]
    reference = generation.real_reference(run, None, splits[other], real,
                                          run.decode(run.encode(real.images)), seed=0)
    defaults = PredictSettings()
    train_grids = load_indices(run.path)["train"].long()
    return scores_over_seeds(seeds, lambda seed: generation.whole_slice_scores(
        run, reference, splits["train"], seed, defaults.temperature, defaults.top_p,
        train_grids))


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.slice_test")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--side", choices=["test", "validate"], default="test")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args(argv)
    try:
        run = Run(args.run, choose_device(args.device))
        splits = load_splits(Path(args.data) if args.data else run.data_root,
                             spacing=run.spacing)
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scores = score_seeds(run, splits, args.side, args.seeds)
    write_json({"side": args.side, "seeds": args.seeds, "scores": scores},
               args.run / f"slice_test_{args.side}.json")
    print_seed_table(scores, CASES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
