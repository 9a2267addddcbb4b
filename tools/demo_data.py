"""Build the embedded demo set (real MNI152 brain MRI, in the OASIS layout) and summarise a data
root: slices, cases and the training split's normalisation per split.

    python -m tools.demo_data                       # build data/demo_oasis if needed, summarise
    python -m tools.demo_data /path/to/OASIS        # summarise your own data root
    python -m tools.demo_data --oasis-size          # a set of OASIS's split sizes, for timing
    python -m tools.demo_data --extra-train 40      # 40 more training subjects, the same test
"""
from __future__ import annotations

import logging
from pathlib import Path

from brainvq.cli import script_parser
from brainvq.data.demo import OASIS_SIZED_SUBJECTS, build_demo_dataset, demo_root
from brainvq.data.slices import DatasetError, case_id
from dataset import compute_normalisation, load_splits


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, prog="python -m tools.demo_data")
    parser.add_argument("root", nargs="?", type=Path,
                        help="data root (default: the demo set, built if needed)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the demo set even if it is complete")
    parser.add_argument("--oasis-size", action="store_true",
                        help="build a demo set of OASIS's split sizes (9,664/1,120/544 slices) "
                             "at ROOT (default data/demo_oasis_full), for timing full-size runs")
    parser.add_argument("--extra-train", type=int, default=0, metavar="N",
                        help="build the demo set with N more training subjects, numbered after "
                             "the test ones (validation and test unchanged), at ROOT (default "
                             "data/demo_oasis_extraN)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.oasis_size:
            root = args.root or demo_root().with_name("demo_oasis_full")
            root = build_demo_dataset(root, *OASIS_SIZED_SUBJECTS.values(), force=args.force)
        elif args.extra_train:
            root = args.root or demo_root().with_name(f"demo_oasis_extra{args.extra_train}")
            root = build_demo_dataset(root, force=args.force, extra_train=args.extra_train)
        else:
            root = args.root or build_demo_dataset(force=args.force)
        splits = load_splits(root)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    for split, slices in splits.items():
        cases = {case_id(name) for name in slices.names}
        print(f"{split:>8}: {len(slices)} slices from {len(cases)} cases, "
              f"tensor {tuple(slices.images.shape)}")
    print(compute_normalisation(splits["train"].images))


if __name__ == "__main__":
    main()
