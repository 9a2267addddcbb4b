"""The code's shape: scripts use library modules and no module imports a script, imports run one
way (no cycles), and no source file grows past one idea's length."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "predict", "compare_priors", "choose_temperature", "bench", "noise_ceiling",
           "context_probe", "texture_test"}
MAX_LINES = 600


def _imports() -> dict[str, set[str]]:
    """Each top-level module → the top-level modules of this repo it imports (anywhere in it)."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_a_script():
    offenders = {(m, s) for m, deps in _imports().items() for s in deps & SCRIPTS}
    assert not offenders, f"modules importing scripts: {sorted(offenders)}"


def test_imports_have_no_cycle():
    graph = _imports()
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


def test_this_check_sees_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from a import x\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    try:
        test_imports_have_no_cycle()
    except AssertionError as err:
        assert "a → b → a" in str(err)
    else:
        raise AssertionError("a cycle went unseen")


def test_source_files_stay_short():
    long = {p.name: n for p in REPO.glob("*.py") if (n := len(p.read_text().splitlines()))
            > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
