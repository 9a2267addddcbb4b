"""Is the generated brains' texture real? The two-sample test of metrics.json sees whole slices at
64×64, where the fine texture inside the brain is below its resolution. This runs the same kind of
test on full-resolution 48×48 patches from inside the brain (`sample_scores.c2st_patch_accuracy`):
the brains `predict.py --evaluate --seed S` generates against as many real test reconstructions,
beside real against real and chimeras (every patch real: both ≈ 0.5) and blurred reconstructions
and unigram slices (texture that must be caught). Writes RUN/texture_test.json.

    python -m tools.texture_test --run runs/demo --seeds 0 1 2
"""
from __future__ import annotations

import sys
from pathlib import Path

from brainvq.checkpoints import load_indices
from brainvq.cli import print_seed_table, scores_over_seeds, script_parser
from brainvq.config import DEFAULT_RUN, PredictSettings
from brainvq.data.slices import DatasetError
from brainvq.distributed import DEVICES, choose_device
from brainvq.evaluation import generation
from brainvq.inference.trained_run import Run
from brainvq.io_utils import RunError, write_json
from dataset import load_splits

CASES = ("texture_c2st_real_vs_real", "texture_c2st_chimera", "texture_c2st",
         "texture_c2st_blurred", "texture_c2st_unigram")


def score_seeds(run: Run, reference: generation.RealReference, seeds: list[int],
                n: int) -> dict[str, list[float]]:
    """{score: one value per seed}."""
    defaults = PredictSettings()
    train_grids = load_indices(run.path)["train"].long()

    def score(seed: int) -> dict[str, float]:
        samples, _ = generation.generated_slices(run, reference, n, seed, defaults.temperature,
                                                 defaults.top_p)
        return generation.texture_scores(run, reference, samples, train_grids, seed)

    return scores_over_seeds(seeds, score)


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.texture_test")
    p.add_argument("--run", type=Path, default=DEFAULT_RUN)
    p.add_argument("--data", help="dataset root (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-samples", type=int, default=PredictSettings().n_eval_samples,
                   help="brains generated (and real slices) per seed")
    args = p.parse_args(argv)
    if args.n_samples < 2:
        p.error("--n-samples must be at least 2")
    try:
        run = Run(args.run, choose_device(args.device))
        splits = load_splits(Path(args.data) if args.data else run.data_root,
                             splits=("validate", "test"), spacing=run.spacing)
        test = splits["test"]
        # the texture test needs no position regressor, hence no training slices
        reference = generation.real_reference(run, None, splits["validate"], test,
                                              run.decode(run.encode(test.images)), seed=0)
    except (RunError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scores = score_seeds(run, reference, args.seeds, args.n_samples)
    write_json({"seeds": args.seeds, "n_samples": args.n_samples, "scores": scores},
               args.run / "texture_test.json")
    print_seed_table(scores, CASES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
