"""Mutation check of the core: does the test suite notice when the models' maths is broken?

Each mutant is one small change to one target file (an operator swapped, a constant moved, a
`.detach()` removed or added, an in-place update deleted, ...), written into a copy of the
working tree in a temporary directory (the tree itself is never touched), where the fast tests
mapped to its target run (`pytest -x`, OMP_NUM_THREADS=1, a time limit). A mutant is killed when
a test fails, an error when the mutated code does not import or collect (reported apart, counted
as killed), a timeout past the limit (counted as killed), and survived otherwise.

Score = (killed + error + timeout) / (mutants − equivalent), where the equivalent mutants (changes
that cannot alter any result) are listed by id, each with its reason, in
tools/mutation_equivalent.txt. A mutant id is TARGET:LINE:COL:OPERATOR (the column of the
operator token, or of the changed expression); it stays valid while the lines above it do.
The JSON report (default runs/mutation.json) lists every mutant with its status and, when
killed, the first test that failed. Not part of CI: a maintainer's check, minutes on two cores.

    python -m tools.mutation_test --list --target modules.py
    python -m tools.mutation_test --target modules.py --only VectorQuantiser
    python -m tools.mutation_test --only modules.py:100:37:detach_add
    python -m tools.mutation_test --jobs 2
    python -m tools.mutation_test --original-tests-only --report runs/mutation_original.json
    python -m tools.mutation_test --survivors-of runs/mutation.json
"""
from __future__ import annotations

import ast
import contextlib
import copy
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from brainvq.cli import script_parser

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = REPO / "tools" / "mutation_equivalent.txt"
DEFAULT_REPORT = REPO / "runs" / "mutation.json"
NOT_COPIED = {".git", "data", "runs", ".gpu"}  # at the top level
CACHES = {"__pycache__", ".pytest_cache", ".ruff_cache"}  # anywhere
PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
STATUSES = ("killed", "error", "timeout", "survived", "equivalent")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class Target:
    """A file to mutate, the parts of it that are mutated, and the tests that must notice."""
    path: str
    scopes: tuple[str, ...]  # qualified names (Class, Class.method, function); () = all of it
    original_tests: tuple[str, ...]  # the suite's own tests, fastest first
    property_tests: tuple[str, ...]  # tests written against these mutants: run first
    deselect: str = ""  # a `-k` expression that leaves out slow tests of those files


QUANTISER_AND_PRIOR = (
    "VectorQuantiser", "at_least_fp32", "_random_rows", "ChannelNorm", "VQVAE", "gate",
    "pointwise", "conv_channels_last", "shift_down", "GatedLayer", "_zero_conv", "PixelCNN",
    "ContextEncoder", "bits", "principal_components")
SAMPLER_TESTS = ("tests/test_modules.py", "tests/test_graph_sampler.py",
                 "tests/test_particles.py")
TARGETS = {t.path: t for t in (
    Target("modules.py", QUANTISER_AND_PRIOR,
           (*SAMPLER_TESTS, "tests/test_context.py", "tests/test_train.py"),
           ("tests/test_quantiser_properties.py", "tests/test_prior_properties.py",
            "tests/test_losses.py", "tests/test_sampler_weights.py"),
           deselect="not probe_finds and not script_writes"),
    Target("brainvq/training/stages.py", ("vqvae_losses", "prior_loss"),
           ("tests/test_train.py",), ("tests/test_losses.py",)),
    Target("brainvq/inference/sampling.py", (),
           (*SAMPLER_TESTS, "tests/test_predict.py"),
           ("tests/test_sampler_properties.py", "tests/test_sampler_weights.py"),
           deselect="not conditional_on_the_whole_grid"),
    Target("brainvq/evaluation/metrics.py", (),
           ("tests/test_metrics.py", "tests/test_train.py"),
           ("tests/test_metric_properties.py",)),
)}

# The two mutants issue 35 found the whole suite blind to; kept whatever --max-mutants says.
ALWAYS_RUN = {("VectorQuantiser._quantise", "detach_add"),
              ("VectorQuantiser._update_codebook", "decay_swap")}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
         ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
FLIPS = {a: b for pair in [(ast.Lt, ast.LtE), (ast.Gt, ast.GtE), (ast.Eq, ast.NotEq),
                            (ast.Is, ast.IsNot), (ast.In, ast.NotIn)]
         for a, b in (pair, pair[::-1])}
NAME_SWAPS = {a: b for pair in [("min", "max"), ("argmin", "argmax"), ("amin", "amax"),
                                ("floor", "ceil"), ("sum", "mean")]
              for a, b in (pair, pair[::-1])}
LOSS_CALLS = re.compile(r"(loss|cross_entropy|^bits)$")
# Pure layout calls: a constant or argument order changed inside them reshapes a tensor, which
# the first test that runs fails on with a shape error; they would pad the score, not test it.
LAYOUT = {"permute", "view", "reshape", "transpose", "unsqueeze", "squeeze", "flatten",
          "expand", "chunk", "repeat", "new_zeros", "zeros", "full", "empty", "randn"}


@dataclass
class Mutant:
    id: str
    target: str
    scope: str
    line: int
    operator: str
    before: str  # the changed source, as written
    after: str  # what replaces it
    span: tuple[int, int] = field(repr=False)  # byte offsets of the replaced source
    status: str = "pending"  # killed / error / timeout / survived / equivalent
    killed_by: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------- finding mutants
class _Finder(ast.NodeVisitor):
    """Walks one module and lists its mutants, leaving out what is not the model's maths:
    docstrings, strings, annotations, argument defaults, decorators, imports, `raise` and
    `assert` statements and `if …: raise` validation, f-strings, and code outside `scopes`."""

    def __init__(self, target: Target, source: bytes) -> None:
        self.target, self.source, self.scope, self.mutants = target, source, [], []
        lengths = [len(line) for line in source.splitlines(keepends=True)]
        self.line_starts = [sum(lengths[:i]) for i in range(len(lengths))]

    # -- positions and bookkeeping (ast's columns count UTF-8 bytes)
    def offset(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col

    def token_after(self, node: ast.AST) -> tuple[int, int]:
        """(line, col) of the first token after `node` that is not a bracket or a space."""
        position = self.offset(node.end_lineno, node.end_col_offset)
        while self.source[position:position + 1] in (b" ", b")", b"\n", b"\\", b"\t"):
            position += 1
        line = max(i for i, start in enumerate(self.line_starts) if start <= position)
        return line + 1, position - self.line_starts[line]

    def add(self, where: tuple[int, int], operator: str, node: ast.AST, new: ast.AST | str,
            expression: bool = True) -> None:
        name = ".".join(self.scope)
        if self.target.scopes and not any(name == s or name.startswith(s + ".")
                                          for s in self.target.scopes):
            return
        span = (self.offset(node.lineno, node.col_offset),
                self.offset(node.end_lineno, node.end_col_offset))
        after = new if isinstance(new, str) else ast.unparse(new)
        if expression and isinstance(node, ast.expr):
            after = f"({after})"
        self.mutants.append(Mutant(f"{self.target.path}:{where[0]}:{where[1]}:{operator}",
                                   self.target.path, ".".join(self.scope), where[0], operator,
                                   self.source[span[0]:span[1]].decode(), after, span))

    # -- structure: scopes and what is left out
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        for stmt in node.body:  # not the decorators, annotations, defaults or base classes
            self.visit(stmt)
        self.scope.pop()

    visit_ClassDef = visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.AST) -> None:  # and the others left out, below
        pass

    visit_ImportFrom = visit_Raise = visit_Assert = visit_JoinedStr = visit_Import

    def visit_If(self, node: ast.If | ast.IfExp) -> None:
        if isinstance(node, ast.If) and not node.orelse and all(
                isinstance(s, ast.Raise) for s in node.body):
            return  # argument validation
        test = node.test  # comparisons and `not` have operators of their own
        if isinstance(test, ast.Name | ast.Attribute | ast.Call | ast.Subscript):
            self.add((test.lineno, test.col_offset), "cond_negate", test,
                     ast.UnaryOp(ast.Not(), copy.deepcopy(test)))
        self.generic_visit(node)

    visit_IfExp = visit_If

    # -- statements
    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call):
            self.add((node.lineno, node.col_offset), "stmt_delete", node, "pass")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.add((node.lineno, node.col_offset), "stmt_delete", node, "pass")
        swapped = SWAPS.get(type(node.op))
        if swapped:
            new = copy.deepcopy(node)
            new.op = swapped()
            self.add(self.token_after(node.target), "arith", node, new)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if all(isinstance(t, ast.Subscript) for t in node.targets):  # an in-place write
            self.add((node.lineno, node.col_offset), "stmt_delete", node, "pass")
        self.generic_visit(node)

    # -- expressions
    def visit_BinOp(self, node: ast.BinOp) -> None:
        strings = any(isinstance(side, ast.JoinedStr) or (isinstance(side, ast.Constant)
                      and isinstance(side.value, str)) for side in (node.left, node.right))
        swapped = SWAPS.get(type(node.op))
        if swapped and not strings:
            where = self.token_after(node.left)
            self.add(where, "arith", node, ast.BinOp(node.left, swapped(), node.right))
            if isinstance(node.op, ast.Sub):
                self.add(where, "swap_operands", node, ast.BinOp(node.right, ast.Sub(),
                                                                 node.left))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for i, (op, right) in enumerate(zip(node.ops, node.comparators, strict=True)):
            if type(op) in FLIPS:
                ops = list(node.ops)
                ops[i] = FLIPS[type(op)]()
                self.add(self.token_after(left), "compare", node,
                         ast.Compare(node.left, ops, node.comparators))
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(self.token_after(node.values[0]), "boolop", node, ast.BoolOp(other, node.values))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        operator = {ast.USub: "neg_drop", ast.Not: "not_drop"}.get(type(node.op))
        if operator:
            self.add((node.lineno, node.col_offset), operator, node, node.operand)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        """bool: flipped; int: 0 → 1, 1 → 0, c → c + 1; float: 0 → 1, c → 2c and c → 0."""
        value, where = node.value, (node.lineno, node.col_offset)
        if isinstance(value, bool):
            changes = [("bool_flip", not value)]
        elif isinstance(value, int):
            changes = [("num_one", 1)] if value == 0 else [("num_zero", 0)] * (value == 1) + [
                ("num_inc", value + 1)]
        elif isinstance(value, float):
            changes = [("num_one", 1.0)] if value == 0 else [("num_double", value * 2),
                                                             ("num_zero", 0.0)]
        else:
            changes = []
        for operator, new in changes:
            self.add(where, operator, node, ast.Constant(new))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in NAME_SWAPS:
            line, col = self.token_after(node.value)
            self.add((line, col + 1), "name_swap", node,
                     ast.Attribute(node.value, NAME_SWAPS[node.attr], node.ctx))
        self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> None:
        if node.arg in ("min", "max"):
            self.add((node.lineno, node.col_offset), "name_swap", node,
                     ast.keyword(NAME_SWAPS[node.arg], node.value), expression=False)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in LAYOUT:  # layout constants left alone, what computes them not
            for child in [func, *node.keywords, *(a for a in node.args if not isinstance(
                    a, ast.Constant | ast.UnaryOp | ast.Name))]:
                self.visit(child)
            return
        if name == "detach" and not node.args and isinstance(func, ast.Attribute):
            self.add(self.token_after(func.value), "detach_remove", node, func.value)
        if LOSS_CALLS.search(name):
            for i, arg in enumerate(node.args):
                detached = (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                            and arg.func.attr == "detach")
                if isinstance(arg, ast.Name | ast.Attribute | ast.Call | ast.Subscript) \
                        and not detached:
                    new = copy.deepcopy(node)
                    new.args[i] = ast.Call(ast.Attribute(arg, "detach", ast.Load()), [], [])
                    self.add((arg.lineno, arg.col_offset), "detach_add", node, new)
        for i, (a, b) in enumerate(zip(node.args, node.args[1:], strict=False)):
            if isinstance(a, ast.Name) and isinstance(b, ast.Name) and a.id != b.id:
                new = copy.deepcopy(node)
                new.args[i], new.args[i + 1] = new.args[i + 1], new.args[i]
                self.add((a.lineno, a.col_offset), "args_swap", node, new)
        self._decay_swap(node)
        self.generic_visit(node)

    def _decay_swap(self, node: ast.Call) -> None:
        """X.mul_(a).add_(b, alpha=c) → X.mul_(c).add_(b, alpha=a): an EMA's two weights."""
        inner = getattr(node.func, "value", None)
        if (getattr(node.func, "attr", "") == "add_" and isinstance(inner, ast.Call)
                and getattr(inner.func, "attr", "") == "mul_" and len(inner.args) == 1
                and any(k.arg == "alpha" for k in node.keywords)):
            new = copy.deepcopy(node)
            keyword = next(k for k in new.keywords if k.arg == "alpha")
            new.func.value.args[0], keyword.value = keyword.value, new.func.value.args[0]
            self.add((inner.args[0].lineno, inner.args[0].col_offset), "decay_swap", node, new)


def find_mutants(target: Target, root: Path = REPO) -> list[Mutant]:
    source = (root / target.path).read_bytes()
    finder = _Finder(target, source)
    finder.visit(ast.parse(source))
    seen: dict[str, int] = {}
    original = ast.dump(ast.parse(source))
    for mutant in finder.mutants:  # the same token and operator twice (rare): number them
        seen[mutant.id] = seen.get(mutant.id, 0) + 1
        mutant.id += f"#{seen[mutant.id]}" if seen[mutant.id] > 1 else ""
        tree = ast.parse(mutated_source(source, mutant))  # must stay valid Python
        assert ast.dump(tree) != original, f"{mutant.id} changes nothing"
    return finder.mutants


def mutated_source(source: bytes, mutant: Mutant) -> bytes:
    start, end = mutant.span
    return source[:start] + mutant.after.encode() + source[end:]


def read_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, str]:
    """Mutant id → why it cannot change a result, from lines `ID  REASON` (# comments)."""
    lines = [line.strip() for line in path.read_text().splitlines()] if path.exists() else []
    return {line.partition(" ")[0]: line.partition(" ")[2].strip() for line in lines
            if line and not line.startswith("#")}


def select(mutants: list[Mutant], only: list[str], max_mutants: int | None,
           seed: int) -> list[Mutant]:
    """Mutants matching any of `only` (an id, a scope or its prefix, or LINE-LINE), then at most
    `max_mutants` of them drawn at random (seeded), the ALWAYS_RUN ones kept."""
    def matches(m: Mutant, key: str) -> bool:
        if re.fullmatch(r"\d+-\d+", key):
            low, high = map(int, key.split("-"))
            return low <= m.line <= high
        return (m.id == key or m.scope == key or m.scope.startswith(key + ".")
                or m.scope.endswith("." + key))
    if only:
        mutants = [m for m in mutants if any(matches(m, key) for key in only)]
    if max_mutants is not None and len(mutants) > max_mutants:
        always = [m for m in mutants if (m.scope, m.operator) in ALWAYS_RUN]
        rest = [m for m in mutants if m not in always]
        keep = set(map(id, always + random.Random(seed).sample(
            rest, max(0, max_mutants - len(always)))))
        mutants = [m for m in mutants if id(m) in keep]
    return mutants


# --------------------------------------------------------------------------- running tests
def copy_tree(destination: Path) -> Path:
    def ignore(directory: str, names: list[str]) -> list[str]:
        top = Path(directory) == REPO
        return [n for n in names if (top and n in NOT_COPIED) or n in CACHES or n.endswith(".pyc")]

    shutil.copytree(REPO, destination, ignore=ignore, symlinks=True)
    return destination


def stages_of(target: Target, original_only: bool) -> list[list[str]]:
    """pytest arguments of each stage: the property tests first (a mutant they kill never
    collects the rest), then the suite's own tests of the target."""
    original = [*PYTEST_FLAGS, *target.original_tests]
    if target.deselect:
        original += ["-k", target.deselect]
    return [original] if original_only else [[*PYTEST_FLAGS, *target.property_tests], original]


def warm_up(targets: list[Target]) -> None:
    """Import, once in this process, what the tests import, then forget the project's own
    modules: each forked child inherits torch, scipy, matplotlib, ... and imports only the
    (mutated) project modules anew."""
    import pytest  # noqa: F401
    import torch
    torch.set_num_threads(1)
    files = {"tests/conftest.py", *(f for t in targets for f in (*t.original_tests,
                                                                  *t.property_tests))}
    nodes = [n for f in files for n in ast.walk(ast.parse((REPO / f).read_text()))]
    names = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    for name in sorted(names):
        with contextlib.suppress(Exception):  # tests' helpers are not importable from here
            __import__(name)
    forget_project_modules()


def forget_project_modules() -> None:
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(str(REPO) + os.sep) and name != "__main__":
            del sys.modules[name]


class _Run:
    """One pytest run in `root`, in a forked child of this (warmed-up) process: each mutant is
    spared the interpreter's start and the heavy imports (POSIX only)."""

    def __init__(self, root: Path, args: list[str], log: Path) -> None:
        self.started, self.log, self.code = time.monotonic(), log, None
        self.pid = os.fork()
        if self.pid == 0:  # the child: forget the working tree's modules, run the copy's tests
            code = 3
            try:
                os.setsid()
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                for stream in (1, 2):
                    os.dup2(fd, stream)
                os.chdir(root)
                forget_project_modules()
                sys.path[:] = [p for p in sys.path if p not in ("", ".", str(REPO))]
                import pytest
                code = int(pytest.main(args))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            self.code = os.waitstatus_to_exitcode(status) if pid else None
        return self.code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.01)


def first_failure(log: Path) -> str:
    match = re.search(r"^(FAILED|ERROR) (\S+)", log.read_text(errors="replace"), flags=re.M)
    return match.group(2) if match else ""


def run_tests(roots: list[Path], target: Target, mutants: list[Mutant],
              stages: list[list[str]], limits: list[float]) -> None:
    """Each mutant through the test stages until one fails, `len(roots)` mutants at a time,
    each in a copy of its own. pytest's exit code 1 (a test failed) kills it, 0 in every stage
    lets it survive; any other (the mutated file does not import, collection breaks) is an
    error."""
    source = (REPO / target.path).read_bytes()
    pending, running, free, done = list(mutants), {}, list(roots), 0
    while pending or running:
        while pending and free:
            mutant, root = pending.pop(0), free.pop()
            (root / target.path).write_bytes(mutated_source(source, mutant))
            running[root] = (mutant, 0, _Run(root, stages[0], root.parent / f"{root.name}.log"))
        time.sleep(0.02)
        for root, (mutant, stage, run) in list(running.items()):
            code, elapsed = run.poll(), time.monotonic() - run.started
            if code is None and elapsed < limits[stage]:
                continue
            mutant.seconds = round(mutant.seconds + elapsed, 2)
            if code is None:
                run.kill()
            if code == 0 and stage + 1 < len(stages):
                running[root] = (mutant, stage + 1, _Run(root, stages[stage + 1], run.log))
                continue
            mutant.status = ("timeout" if code is None else "survived" if code == 0
                             else "killed" if code == 1 else "error")
            mutant.killed_by = first_failure(run.log) if code not in (None, 0) else ""
            (root / target.path).write_bytes(source)
            del running[root]
            free.append(root)
            done += 1
            print(f"  [{done}/{len(mutants)}] {mutant.status:8} {mutant.seconds:5.1f}s "
                  f"{mutant.id}  {mutant.before!r} → {mutant.after!r}", flush=True)


def baseline(root: Path, stages: list[list[str]], log: Path) -> list[float] | None:
    """Seconds of each test stage on the unmutated copy; None (and the log shown) if it fails."""
    seconds = []
    for args in stages:
        run = _Run(root, args, log)
        while run.poll() is None:
            time.sleep(0.05)
        if run.code != 0:
            print(log.read_text()[-3000:])
            return None
        seconds.append(time.monotonic() - run.started)
    return seconds


# ------------------------------------------------------------------------------ reporting
def summarise(mutants: list[Mutant]) -> dict[str, float]:
    counts = {s: sum(m.status == s for m in mutants) for s in STATUSES}
    counts["total"] = len(mutants)
    scored = counts["total"] - counts["equivalent"]
    detected = counts["killed"] + counts["error"] + counts["timeout"]
    counts["score"] = round(detected / scored, 4) if scored else 1.0
    return counts


def print_summary(plan: dict[str, list[Mutant]]) -> None:
    every = [m for ms in plan.values() for m in ms]
    print(f"\n{'target':31} {'total':>5} " + " ".join(f"{s:>8}" for s in STATUSES) + "  score")
    for name, ms in [*plan.items(), ("all", every)]:
        row = summarise(ms)
        print(f"{name:31} {row['total']:5} " + " ".join(f"{row[s]:8}" for s in STATUSES)
              + f" {row['score']:6.1%}")
    for m in (m for m in every if m.status == "survived"):
        print(f"survived: {m.id} ({m.scope}): {m.before!r} → {m.after!r}")


def parse_args(argv: list[str] | None = None):
    parser = script_parser(__doc__, prog="python -m tools.mutation_test")
    add = parser.add_argument
    add("--target", action="append", choices=sorted({*TARGETS, *(Path(t).name for t in TARGETS)}),
        help="only this target (repeatable)")
    add("--only", action="append", default=[], metavar="NAME", help="only the mutants of this "
        "function or class (VectorQuantiser, PixelCNN.slice_condition), LINE-LINE, or an id")
    add("--max-mutants", type=int, help="at most this many per target (a seeded sample)")
    add("--seed", type=int, default=0, help="the sample's seed")
    add("--list", action="store_true", help="print the mutants, run nothing")
    add("--original-tests-only", action="store_true", help="run the suite's own tests of each "
        "target only, not the property tests written against these mutants")
    add("--survivors-of", type=Path, metavar="REPORT", help="only the survivors of a report")
    add("--jobs", type=int, default=1, help="mutants tested at once")
    add("--timeout", type=float, help="seconds per mutant and test stage (default: 3× the "
        "unmutated stage + 20)")
    add("--report", type=Path, default=DEFAULT_REPORT, help="the JSON report")
    return parser.parse_args(argv)


def plan_mutants(args, targets: list[Target], equivalent: dict[str, str]
                 ) -> dict[str, list[Mutant]]:
    """The mutants to test per target; warns of equivalent ids that match no mutant."""
    only = list(args.only)
    if args.survivors_of:
        only += [m["id"] for m in json.loads(args.survivors_of.read_text())["mutants"]
                 if m["status"] == "survived"] or ["-"]
    every = {t.path: find_mutants(t) for t in targets}
    known = {m.id for ms in every.values() for m in ms}
    for stale in sorted(i for i in equivalent if i not in known
                        and any(i.startswith(t.path + ":") for t in targets)):
        print(f"warning: {EQUIVALENT_FILE.name} lists {stale}, which no mutant has",
              file=sys.stderr)
    return {path: select(ms, only, args.max_mutants, args.seed) for path, ms in every.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    sys.dont_write_bytecode = True  # a mutant's .pyc could be taken for the next one's
    targets = [t for t in TARGETS.values()
               if not args.target or {t.path, Path(t.path).name} & set(args.target)]
    equivalent = read_equivalent()
    plan = plan_mutants(args, targets, equivalent)
    if args.list:
        for m in (m for ms in plan.values() for m in ms):
            mark = "  [equivalent]" if m.id in equivalent else ""
            print(f"{m.id} ({m.scope}): {m.before!r} → {m.after!r}{mark}")
        print(f"{sum(map(len, plan.values()))} mutants", file=sys.stderr)
        return 0
    warm_up(targets)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        roots = [copy_tree(Path(tmp) / f"tree{i}") for i in range(max(1, args.jobs))]
        for target in targets:
            mutants = plan[target.path]
            for m in mutants:
                m.status = "equivalent" if m.id in equivalent else m.status
            todo = [m for m in mutants if m.status == "pending"]
            if not todo:
                continue
            stages = stages_of(target, args.original_tests_only)
            seconds = baseline(roots[0], stages, Path(tmp) / "baseline.log")
            if seconds is None:
                print(f"the unmutated tests of {target.path} fail: stopping")
                return 1
            limits = [args.timeout or 3 * s + 20 for s in seconds]
            print(f"{target.path}: {len(todo)} mutants (+{len(mutants) - len(todo)} "
                  f"equivalent), unmutated test stages {', '.join(f'{s:.1f}s' for s in seconds)}"
                  f", limits {', '.join(f'{s:.0f}s' for s in limits)}", flush=True)
            run_tests(roots, target, todo, stages, limits)
    report = {"seconds": round(time.monotonic() - started, 1),
              "tests": "original" if args.original_tests_only else "original+property",
              "command": " ".join(["python -m tools.mutation_test", *(argv or sys.argv[1:])]),
              "targets": {name: summarise(ms) for name, ms in plan.items()},
              "mutants": [{k: v for k, v in asdict(m).items() if k != "span"}
                          for ms in plan.values() for m in ms]}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_summary(plan)
    print(f"\n{report['seconds']:.0f}s; report in {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
