"""What the entry scripts and tools share on the command line: `--help` shows a script's
description, then its flags, then the examples its docstring ends with."""
from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import numpy as np


def script_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is `doc` up to its examples (from the first line indented by
    four spaces) and whose epilog is those examples."""
    start = re.search(r"^    \S", doc, flags=re.M)
    description, examples = (doc[:start.start()], doc[start.start():]) if start else (doc, "")
    return argparse.ArgumentParser(
        prog=prog, description=description.strip(),
        epilog=f"examples:\n{examples.rstrip()}" if examples.strip() else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def print_seed_table(scores: dict[str, list[float]], names: tuple[str, ...]) -> None:
    """A markdown table of each named score's mean ± sd over seeds ("–" where every seed gave
    NaN, e.g. a test with one subject a side)."""
    print("| score | mean ± sd over seeds |")
    print("|---|---|")
    for name in (n for n in names if n in scores):
        values = np.asarray(scores[name], dtype=float)
        if np.isnan(values).all():
            print(f"| {name} | – |")
        else:
            print(f"| {name} | {np.nanmean(values):.3f} ± {np.nanstd(values):.3f} |")


def scores_over_seeds(seeds: list[int],
                      score: Callable[[int], dict[str, float]]) -> dict[str, list[float]]:
    """{name: one value per seed} of `score(seed)`, each seed's line printed as it comes."""
    scores: dict[str, list[float]] = {}
    for seed in seeds:
        start = time.time()
        for name, value in score(seed).items():
            scores.setdefault(name, []).append(value)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items())
              + f" ({time.time() - start:.0f}s)", flush=True)
    return scores
