"""The code's shape, read from the source: the entry scripts and tools/ use the package, the package
uses the models, no module imports a script, imports run one way (no cycle), and no source file
grows past one idea's length. Each rule is also shown to fail on a tree that breaks it."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"train", "predict", "modules", "dataset"}
ENTRY_SCRIPTS = {"train", "predict"}
MODELS = {"modules", "dataset"}
# The package's base: what the models may import. Each imports nothing above it.
FOUNDATION = {"brainvq.distributed", "brainvq.io_utils", "brainvq.positions",
              "brainvq.data.slices", "brainvq.data.volumes"}
PACKAGES = ("brainvq", "tools")
MAX_LINES = 600


def modules_of(root: Path) -> dict[str, Path]:
    """Dotted name → file, for the top-level scripts and everything inside the packages."""
    found = {path.stem: path for path in root.glob("*.py")}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def scripts_of(root: Path) -> set[str]:
    return ENTRY_SCRIPTS | {name for name in modules_of(root) if name.startswith("tools.")}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module → the project modules it imports, anywhere in it (`from pkg import mod`
    counts as importing `pkg.mod`)."""
    modules = modules_of(root)
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import (write it absolute)"
                found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}"
                          in modules else node.module for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def check_no_module_imports_a_script(root: Path) -> None:
    scripts = scripts_of(root)
    offenders = {(m, s) for m, deps in import_graph(root).items() for s in deps & scripts}
    assert not offenders, f"modules importing scripts: {sorted(offenders)}"


def check_no_cycle(root: Path) -> None:
    graph = import_graph(root)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", f"import cycle: {' → '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def check_layers(root: Path) -> None:
    """The models import only the package's base, and the base only itself."""
    graph = import_graph(root)
    for module in (MODELS | FOUNDATION) & graph.keys():
        above = graph[module] - FOUNDATION
        assert not above, f"{module} imports {sorted(above)}, above the package's base"


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"train.py": "", "brainvq/__init__.py": "", "tools/__init__.py": "",
                       **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_top_level_holds_only_the_entry_scripts_and_the_models():
    assert {p.stem for p in REPO.glob("*.py")} == TOP_LEVEL


def test_package_inits_import_nothing():
    """Importing one module of a package never runs another's imports (no import-time cycle)."""
    inits = [p for package in PACKAGES for p in (REPO / package).rglob("__init__.py")]
    assert inits and not [p for p in inits if p.read_text().strip()]


def test_no_module_imports_a_script():
    check_no_module_imports_a_script(REPO)


def test_imports_have_no_cycle():
    check_no_cycle(REPO)


def test_models_import_only_the_package_base():
    check_layers(REPO)


def test_the_checks_see_every_package_and_tool():
    graph = import_graph(REPO)
    assert {"brainvq.training.stages", "brainvq.inference.sampling", "tools.bench"} <= graph.keys()
    assert "brainvq.inference.sampling" in graph["brainvq.inference.cuda_graph"]


PLANTED = {
    "a cycle inside the package": (
        {"brainvq/a.py": "from brainvq import b\n", "brainvq/b.py": "from brainvq.a import x\n"},
        "check_no_cycle", "brainvq.a → brainvq.b → brainvq.a"),
    "a module importing a tool": (
        {"brainvq/helper.py": "from tools.probe import main\n", "tools/probe.py": ""},
        "check_no_module_imports_a_script", "brainvq.helper.*tools.probe"),
    "a module importing an entry script": (
        {"brainvq/other.py": "import train\n"},
        "check_no_module_imports_a_script", "brainvq.other.*train"),
    "a model importing the training code": (
        {"modules.py": "from brainvq.training.engine import fit\n",
         "brainvq/training/__init__.py": "", "brainvq/training/engine.py": ""},
        "check_layers", "modules imports .*brainvq.training.engine"),
}


@pytest.mark.parametrize("case", PLANTED)
def test_each_check_fails_on_a_tree_that_breaks_it(tmp_path, case):
    files, check_name, message = PLANTED[case]
    check = globals()[check_name]
    check(_plant(tmp_path / "clean", {}))  # the same checks pass without the plant
    with pytest.raises(AssertionError, match=message):
        check(_plant(tmp_path / "planted", files))


def test_source_files_stay_short():
    long = {str(p.relative_to(REPO)): n for p in modules_of(REPO).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
