"""How well could any model reconstruct the demo test slices? The demo adds noise inside the
brain; no 8×-compressed code can carry it, so the best reconstruction is the noise-free slice.
This scores those noise-free slices against the test split as a reconstruction would be
scored, and writes the ceiling to runs/noise_ceiling.json.

    python -m tools.noise_ceiling
"""
from __future__ import annotations

import sys
from pathlib import Path

from brainvq.cli import script_parser
from brainvq.data.demo import demo_test_pairs
from brainvq.evaluation.metrics import image_scores, mean_scores
from brainvq.io_utils import write_json


def main(argv: list[str] | None = None) -> int:
    p = script_parser(__doc__, prog="python -m tools.noise_ceiling")
    p.add_argument("--out", type=Path, default=Path("runs/noise_ceiling.json"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    noisy, clean = demo_test_pairs()
    rows = [image_scores(n / 255.0, c / 255.0) for n, c in zip(noisy, clean, strict=True)]
    ceiling = {f"test_{key}": value for key, value in mean_scores(rows).items()}
    write_json({**ceiling, "n_test_images": len(rows)}, args.out)
    for key, value in ceiling.items():
        print(f"{key:>16}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
