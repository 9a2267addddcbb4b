"""What the entry scripts and tools share on the command line: `--help` shows a script's
description, then its flags, then the examples its docstring ends with."""
from __future__ import annotations

import argparse
import re


def script_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is `doc` up to its examples (from the first line indented by
    four spaces) and whose epilog is those examples."""
    start = re.search(r"^    \S", doc, flags=re.M)
    description, examples = (doc[:start.start()], doc[start.start():]) if start else (doc, "")
    return argparse.ArgumentParser(
        prog=prog, description=description.strip(),
        epilog=f"examples:\n{examples.rstrip()}" if examples.strip() else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
