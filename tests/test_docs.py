"""The documentation's shape, read from the Markdown: a short README that opens with the two
commands and reaches "Your own data" early, relative links and #anchors that resolve, no sentence
that dates itself against "now" (a commit hash does that job), and no tool run the old way
(`python bench.py` instead of `python -m tools.bench`). Each check is a function of text or
paths, and each is also shown to fail on a planted bad case. No torch: this runs in a second."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
COMMANDS = (
    "pip install -r requirements.txt && python train.py && python predict.py --evaluate",
    "pip install -r requirements.txt && python -m pytest -q",
)
OWN_DATA_HEADING = "Your own data"
OWN_DATA_BY_LINE = 120
# Phrases that tell history relative to the reader's "now"; say "commit abc1234" instead.
HISTORY_PHRASES = (
    "previous preset", "previous version", "previous commit", "version before", "versions ago",
    "presets ago", "earlier version", "first version", "this version", "next version",
    "since this", "the old preset", "the old codebook", "added since", "no longer", "until now",
    "as before", "the next preset", "the preset before",
)
SCRIPTS_RUN_AS_FILES = {"train", "predict"}  # every other Python command is `python -m tools.X`
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
PYTHON_FILE_COMMAND = re.compile(r"\bpython3? (?P<script>[\w/.-]+)\.py\b")


def doc_files(root: Path) -> list[Path]:
    """README.md, CHANGELOG.md where there is one, and every Markdown file under docs/."""
    found = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    if (root / "CHANGELOG.md").exists():
        found.append(root / "CHANGELOG.md")
    return found


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    inside, kept = False, []
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            kept.append((number, line))
    return kept


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, title) of the ATX headings outside code blocks."""
    found = []
    for number, line in prose_lines(text):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            found.append((number, len(match.group(1)), match.group(2)))
    return found


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped (word
    characters, hyphens and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link renders as its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, repeats numbered as GitHub numbers them (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, _, title in headings(text):
        base = anchor(title)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked out, its line breaks kept."""
    kept = dict(prose_lines(text))
    lines = [kept.get(number, "") for number in range(1, len(text.splitlines()) + 1)]
    return INLINE_CODE.sub(lambda code: "\n" * code.group(0).count("\n"), "\n".join(lines))


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of the inline links and images outside code; a link's text may
    wrap across lines."""
    prose = without_code(text)
    return [(prose.count("\n", 0, match.start()) + 1, match.group("target"))
            for match in LINK.finditer(prose)]


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file, or whose #anchor, does not exist."""
    problems = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where} (no such file)")
        elif fragment and (linked.is_dir() or linked.suffix != ".md"):
            problems.append(f"{where} (an anchor into a file that is not Markdown)")
        elif fragment and fragment not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{where} (no heading with that anchor)")
    return problems


def history_phrases(text: str) -> list[str]:
    """The history-relative phrases that the text uses, case-insensitive."""
    lowered = " ".join(text.lower().split())  # a phrase may wrap across lines
    return [phrase for phrase in HISTORY_PHRASES if phrase in lowered]


def tools_run_as_files(text: str) -> list[str]:
    """Commands such as `python bench.py` that should read `python -m tools.bench`."""
    return [match.group(0) for match in PYTHON_FILE_COMMAND.finditer(text)
            if match.group("script") not in SCRIPTS_RUN_AS_FILES]


def line_count(text: str) -> int:
    return len(text.splitlines())


def commands_open(text: str, commands: tuple[str, ...] = COMMANDS, within: int = 8) -> bool:
    """The first `within` non-blank lines after the title hold every command, in order."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    opening = lines[:within]
    positions = [opening.index(command) if command in opening else -1 for command in commands]
    return -1 not in positions and positions == sorted(positions)


def heading_line(text: str, title: str) -> int | None:
    """Line number of the first heading whose title is `title`, or None."""
    return next((number for number, _, found in headings(text) if found == title), None)


# ---- the repository's documentation ------------------------------------------------------------

def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_is_short():
    assert line_count(readme()) <= README_MAX_LINES


def test_readme_opens_with_the_two_commands():
    assert commands_open(readme()), f"README's first lines after the title must be {COMMANDS}"


def test_own_data_comes_early():
    line = heading_line(readme(), OWN_DATA_HEADING)
    assert line is not None, f"README has no heading '{OWN_DATA_HEADING}'"
    assert line <= OWN_DATA_BY_LINE, f"'{OWN_DATA_HEADING}' on line {line}"


@pytest.mark.parametrize("path", doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert not broken_links(path)


@pytest.mark.parametrize("path", doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_no_history_relative_phrases(path):
    assert not history_phrases(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", doc_files(REPO), ids=lambda p: str(p.relative_to(REPO)))
def test_tools_are_run_as_modules(path):
    assert not tools_run_as_files(path.read_text(encoding="utf-8"))


def test_docs_exist():
    names = {path.relative_to(REPO).as_posix() for path in doc_files(REPO)}
    assert {"docs/results.md", "docs/experiments.md", "docs/performance.md",
            "docs/data.md"} <= names


# ---- each check fails on a planted bad case -------------------------------------------------

def test_anchor_follows_github():
    assert anchor("Several GPUs, and resuming") == "several-gpus-and-resuming"
    assert anchor("Fewer codes: what the prior gains") == "fewer-codes-what-the-prior-gains"
    assert anchor("`metrics.json`, key by key") == "metricsjson-key-by-key"
    assert anchor("Is it real? Test_ssim") == "is-it-real-test_ssim"
    assert anchors("# A\n## A\n```\n# B\n```\n") == {"a", "a-1"}


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Some section, here\n")
    (tmp_path / "README.md").write_text("# Title\n\n## Local part\n")
    return tmp_path


def test_good_links_pass(tree):
    (tree / "README.md").write_text(
        "# Title\n\n## Local part\n\n[a](docs/other.md) [b](docs/other.md#some-section-here) "
        "[c](#local-part) [d](https://example.org/x#y) ![e](docs) `[f](nowhere.md)`\n"
        "```\n[g](nowhere.md)\n```\n")
    assert broken_links(tree / "README.md") == []


def test_a_broken_link_fails(tree):
    (tree / "README.md").write_text("# Title\n\nSee [the data](docs/missing.md).\n")
    assert "no such file" in " ".join(broken_links(tree / "README.md"))


def test_a_link_wrapped_across_lines_is_checked(tree):
    (tree / "README.md").write_text("# Title\n\nSee `code` [the\ndata](docs/missing.md).\n")
    assert broken_links(tree / "README.md") == ["README.md:3: docs/missing.md (no such file)"]


def test_a_missing_anchor_fails(tree):
    (tree / "README.md").write_text("# Title\n\n[x](docs/other.md#no-such-section) [y](#nope)\n")
    assert len(broken_links(tree / "README.md")) == 2


def test_a_link_from_docs_resolves_from_docs(tree):
    (tree / "docs" / "more.md").write_text("[up](../README.md#local-part) [bad](README.md)\n")
    problems = broken_links(tree / "docs" / "more.md")
    assert len(problems) == 1 and "README.md (no such file)" in problems[0]


def test_a_planted_phrase_fails():
    assert history_phrases("Measured on commit 3b89215 with the K = 512 preset.") == []
    assert history_phrases("With the Previous\npreset it was 0.5.") == ["previous preset"]
    assert "versions ago" in history_phrases("the demo preset of two versions ago")


def test_a_tool_run_as_a_file_fails():
    assert tools_run_as_files("`python train.py` then `python -m tools.bench --quick`") == []
    assert tools_run_as_files("run `python bench.py --quick`") == ["python bench.py"]


def test_a_long_readme_fails():
    assert line_count("line\n" * (README_MAX_LINES + 1)) > README_MAX_LINES


def test_commands_elsewhere_fail():
    fence = "```bash\n{}\n```\n"
    good = "# T\n\n" + fence.format(COMMANDS[0]) + "\n" + fence.format(COMMANDS[1])
    assert commands_open(good)
    assert not commands_open("# T\n\n" + "Some prose.\n" * 8 + good)
    assert not commands_open("# T\n\n" + fence.format(COMMANDS[1]) + fence.format(COMMANDS[0]))
    assert not commands_open("# T\n\n" + fence.format(COMMANDS[0]))


def test_own_data_late_fails():
    late = "# T\n" + "text\n" * OWN_DATA_BY_LINE + f"## {OWN_DATA_HEADING}\n"
    assert heading_line(late, OWN_DATA_HEADING) > OWN_DATA_BY_LINE
    assert heading_line("# T\n## Other\n", OWN_DATA_HEADING) is None
