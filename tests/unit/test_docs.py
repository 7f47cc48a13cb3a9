"""The README and the documentation site (docs/, built by mkdocs-material) say only what is true.

The site builds in strict mode (a broken link or anchor fails it); every YAML block that is a run
config validates (one marked `<!-- fragment -->` on the line before its fence need only name keys
the config has); every command in a code block names a `tidal` subcommand, script, module and
config files that exist, and its overrides validate; every repository path and every
`file.py:name` in backticks exists; docs/architecture.md's table of packages is the map
tests/unit/test_layout.py enforces, and every call on its diagram is one the page names in code.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from tidal.config import ConfigError, RunConfig, load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SHELLS = {"bash", "sh", "shell", "console"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:tidal|configs|bench|scripts|examples|tests|docs)/[\w./-]*)")
CODE_REF = re.compile(r"^(tidal/[\w/]+\.py):([A-Za-z_][\w.]*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    """The line of the opening fence (1-based)."""
    lang: str
    text: str
    fragment: bool

    def where(self, line: int | None = None) -> str:
        return f"{self.page.relative_to(REPO)}:{line or self.line} ({self.lang} block)"


def blocks(page: Path) -> list[Block]:
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, start = m.group(1), i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        fragment = start > 0 and lines[start - 1].strip() == FRAGMENT
        out.append(Block(page, start + 1, m.group(2).lower(), "\n".join(lines[start + 1 : i]), fragment))
        i += 1
    return out


def prose(page: Path) -> str:
    """The page without its fenced blocks (each line kept, blanked, so line numbers hold)."""
    lines = page.read_text().splitlines()
    for b in blocks(page):
        for j in range(b.line - 1, b.line + len(b.text.splitlines()) + 1):
            if j < len(lines):
                lines[j] = ""
    return "\n".join(lines)


def inline_code(page: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks (a span may run over a line break)."""
    text = prose(page)
    return [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in re.finditer(r"`([^`]+)`", text)]


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]


# ------------------------------------------------------------------------------------------- the site


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (`pip install -e '.[dev]'` installs it): the site is not built")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"`mkdocs build --strict` failed:\n{proc.stdout}\n{proc.stderr}"


# --------------------------------------------------------------------------------------------- configs


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models(a)]


def unknown_keys(tree: Any, annotation: Any, path: str = "") -> list[str]:
    """The dotted key paths of `tree` (a YAML fragment) that the config models in `annotation` lack.
    A tagged union's variant is the one `type` names, else any variant that has the key."""
    if isinstance(tree, list):
        return [e for i, item in enumerate(tree) for e in unknown_keys(item, annotation, f"{path}[{i}]")]
    models = _models(annotation)
    if not isinstance(tree, dict) or not models:
        return []
    if len(models) > 1 and "type" in tree:
        models = [m for m in models if m.model_fields["type"].default == tree["type"]]
        if not models:
            return [f"{path}.type={tree['type']!r} (no such variant)"]
    errors = []
    for key, value in tree.items():
        fields = [m.model_fields[key] for m in models if key in m.model_fields]
        where = f"{path}.{key}" if path else str(key)
        if not fields:
            errors.append(where)
        else:
            errors += unknown_keys(value, fields[0].annotation, where)
    return errors


CONFIG_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml")]


@pytest.mark.parametrize("block", CONFIG_BLOCKS, ids=lambda b: b.where())
def test_every_config_block_validates(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        tree = yaml.safe_load(block.text)
    except yaml.YAMLError as e:
        pytest.fail(f"{block.where()}: not valid YAML: {e}")
    if not isinstance(tree, dict) or not set(tree) & set(RunConfig.model_fields):
        return  # not a run config
    if block.fragment:
        assert unknown_keys(tree, RunConfig) == [], f"{block.where()}: keys the config does not have"
        return
    path = tmp_path / "block.yaml"
    path.write_text(block.text)
    monkeypatch.chdir(REPO)  # paths in a config are relative to where tidal runs: the repository root
    try:
        load_config(path)
    except ConfigError as e:
        pytest.fail(f"{block.where()}: {e} (a block meant to be partial: mark it with {FRAGMENT} before the fence)")


def test_a_fragment_with_a_wrong_key_is_caught() -> None:
    tree = yaml.safe_load(
        "rollout: {max_staleness: 8, adaptive: {m2_target: 0.1}}\n"
        "algorithm: {loss: {correction: {type: mask, c: 2}}}\n"
        "envs: [{name: math, wieght: 1}]"
    )
    assert unknown_keys(tree, RunConfig) == ["rollout.adaptive", "algorithm.loss.correction.c", "envs[0].wieght"]


# -------------------------------------------------------------------------------------------- commands


def commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of a shell block: `$ ` lines of a console block, every line of the others,
    comments and blank lines left out, continued lines joined."""
    out: list[tuple[int, str]] = []
    pending, first = "", 0
    for n, line in enumerate(block.text.splitlines(), block.line + 1):
        s = line.strip()
        if block.lang == "console" and not pending:
            if not s.startswith("$ "):
                continue
            s = s[2:]
        if not pending and (not s or s.startswith("#")):
            continue
        first = first or n
        if s.endswith("\\"):
            pending += s[:-1] + " "
            continue
        out.append((first, pending + s))
        pending, first = "", 0
    return out


COMMANDS = [(b, n, c) for b in ALL_BLOCKS if b.lang in SHELLS for n, c in commands(b)]


def cli_has(sub: str) -> bool:
    """Whether `tidal <sub>` is a subcommand of tidal's parser."""
    import argparse

    from tidal.cli import parser

    subcommands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub in subcommands.choices


def placeholder(arg: str) -> bool:
    """An argument a user fills in: CONFIG, RUN_DIR, [key=value ...], <seed>."""
    return arg.isupper() or arg.startswith("[") or arg.endswith("]") or "..." in arg or "<" in arg


def check_tidal(words: list[str]) -> list[str]:
    if not words:
        return ["`tidal` without a subcommand"]
    sub, args = words[0], words[1:]
    if not cli_has(sub):
        return [f"`tidal {sub}` is not a subcommand of tidal.cli.parser()"]
    if sub == "plot":  # run directories: the outputs of runs, not files of the repository
        return []
    if "--stage" in args:
        i = args.index("--stage")
        args = args[:i] + args[i + 2 :]
    given = [a for a in args if not placeholder(a)]
    positional = [a for a in given if "=" not in a and not a.startswith("-")]
    overrides = [a for a in given if "=" in a and not a.startswith("checkpoint=")]
    if any(a.startswith("checkpoint=") for a in given) and sub != "eval":
        return ["checkpoint=PATH is an argument of `tidal eval` only"]
    if positional and not (REPO / positional[0]).is_file():
        return [f"the config {positional[0]} does not exist"]
    config = positional[0] if positional else None
    if config is None and args and not placeholder(args[0]):
        return ["no config file"]
    try:
        load_config(config, overrides)
    except ConfigError as e:
        return [str(e)]
    return []


def check_command(command: str) -> list[str]:
    """What is wrong with a documented command line (empty when nothing, or when it is not tidal's)."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
        words = words[1:]
    if not words:
        return []
    name = Path(words[0]).name
    if name == "tidal":
        return check_tidal(words[1:])
    if re.fullmatch(r"python(3(\.\d+)?)?", name) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2:
            module = words[2]
            if module.split(".")[0] == "tidal" and importlib.util.find_spec(module) is None:
                return [f"no module {module}"]
            return []
        if words[1].endswith(".py") and not (REPO / words[1]).is_file():
            return [f"no script {words[1]}"]
        return []
    if name in ("bash", "sh") and len(words) > 1 and words[1].endswith(".sh") and not (REPO / words[1]).is_file():
        return [f"no script {words[1]}"]
    return []  # pip, git, ray, mkdocs, export, cd: not ours to check


@pytest.mark.parametrize(("block", "line", "command"), COMMANDS, ids=[b.where(n) for b, n, _ in COMMANDS])
def test_every_command_runs(block: Block, line: int, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert check_command(command) == [], f"{block.where(line)}: `{command}`"


def test_a_wrong_command_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert check_command(".venv/bin/tidal train configs/quickstart.yaml rollout.max_stalenes=2") != []
    assert check_command(".venv/bin/tidal train configs/nowhere.yaml") != []
    assert check_command(".venv/bin/tidal trian CONFIG") != []
    assert check_command(".venv/bin/python bench/nowhere.py --steps 3") != []
    assert check_command("bash scripts/nowhere.sh") != []
    assert check_command("python -m tidal.nowhere") != []
    assert check_command(".venv/bin/tidal train CONFIG ray.address=auto   # a comment") == []


PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where())
def test_every_python_block_compiles(block: Block) -> None:
    try:
        ast.parse(block.text)
    except SyntaxError as e:
        pytest.fail(f"{block.where()}: {e}")


# --------------------------------------------------------------------------------------- paths, links


def defines(path: Path, qualname: str) -> bool:
    """Whether the module at `path` defines `qualname` (a function, class, method or assignment)."""
    scope = ast.parse(path.read_text()).body
    for part in qualname.split("."):
        found = None
        for node in scope:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == part:
                found = node
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == part for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == part:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_in_backticks_exists(page: Path) -> None:
    missing = []
    for n, span in inline_code(page):
        if (ref := CODE_REF.match(span.strip())) is not None:
            file, name = ref.groups()
            if not (REPO / file).is_file() or not defines(REPO / file, name):
                missing.append(f"{page.relative_to(REPO)}:{n}: `{span}` names no {name} in {file}")
            continue
        for path in REPO_PATH.findall(span):
            path = path.split(":")[0].rstrip(".,")
            if "*" not in path and not (REPO / path).exists():
                missing.append(f"{page.relative_to(REPO)}:{n}: `{span}` names {path}, which does not exist")
    assert missing == []


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc both make it, for headings of words and punctuation."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", prose(page), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    text = prose(page)
    for m in LINK.finditer(text):  # a link's text may run over a line break
        target, n = m.group(1), text.count("\n", 0, m.start()) + 1
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{page.relative_to(REPO)}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.relative_to(REPO)}:{n}: {target} (no heading #{anchor})")
    assert broken == []


def test_the_readme_is_a_five_minute_read() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines: move the details to a page under docs/"


# -------------------------------------------------------------------------------------------- architecture

ARCHITECTURE = REPO / "docs" / "architecture.md"


def layout_rooms() -> dict[str, set[str]]:
    """ROOMS of tests/unit/test_layout.py (tests/ is not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("tidal_test_layout", REPO / "tests" / "unit" / "test_layout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROOMS


def table_after(page: Path, heading: str) -> list[dict[str, str]]:
    """The rows of the first table under `heading`, as {column: cell}."""
    text = prose(page)
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    head, _, *body = [[c.strip() for c in r.strip().strip("|").split("|")] for r in lines[start:end]]
    return [dict(zip(head, cells, strict=True)) for cells in body]


def test_the_architecture_page_lists_the_rooms_of_the_layout_test() -> None:
    rows = table_after(ARCHITECTURE, "## Packages and what each may import")
    documented = {row["package"].strip("`"): set(re.findall(r"`(\w+)`", row["may import"])) for row in rows}
    assert documented == layout_rooms(), "docs/architecture.md's table of packages differs from ROOMS"


def test_every_call_on_the_architecture_diagram_is_named_in_code() -> None:
    (diagram,) = [b for b in blocks(ARCHITECTURE) if b.lang == "mermaid"]
    labels = re.findall(r'\|"([^"]*)"\|', diagram.text)
    calls = {c for label in labels for c in re.findall(r"(\w+)\(", label)}
    named = {
        span.strip().rpartition(".")[2].rpartition(":")[2]
        for _, span in inline_code(ARCHITECTURE)
        if CODE_REF.match(span.strip())
    }
    assert calls, "the diagram names no call"
    assert sorted(calls - named) == [], "calls on the diagram that no `file.py:name` on the page names"
