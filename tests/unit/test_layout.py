"""The package layout is the architecture: each room of `tidal/` imports only the rooms below it.

`ROOMS` is the map (docs/architecture.md draws it); this test fails on an import that runs back up,
on a room the map does not name, and on an import cycle between modules, lazy imports included.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "tidal"

# Each room, and the rooms it may import. `tidal` itself (its version) any room may import.
ROOMS: dict[str, set[str]] = {
    "config": set(),
    "telemetry": {"config"},
    "types": {"telemetry"},
    "data": {"config"},
    "runtime": {"config"},
    "plugins": {"config"},
    "model": {"config", "telemetry", "types"},
    "weight_sync": {"config"},
    "checkpoint": {"config", "telemetry", "types", "runtime"},
    "rewards": {"config", "telemetry", "types", "data", "plugins"},
    "envs": {"config", "types", "plugins", "rewards"},
    "rollout": {"config", "telemetry", "types", "data", "plugins", "model", "weight_sync", "rewards", "envs"},
    "trainer": {"config", "telemetry", "types", "runtime", "model", "weight_sync", "checkpoint"},
    "driver": {"config", "telemetry", "types", "runtime", "checkpoint", "weight_sync", "rollout", "trainer"},
    "stages": {
        "config",
        "telemetry",
        "types",
        "data",
        "runtime",
        "plugins",
        "model",
        "checkpoint",
        "rewards",
        "envs",
        "rollout",
        "trainer",
        "driver",
    },
    "cli": {"config", "telemetry", "runtime", "stages"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The tidal modules `module` imports, anywhere in it (inside functions too)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level` - 1 above
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [base] * bool(base))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("tidal") and name != module:
                found.add(name)
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: `tidal` itself


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_the_room_map_has_no_cycle() -> None:
    tuple(TopologicalSorter(ROOMS).static_order())  # raises CycleError


def test_every_module_lives_in_a_room_of_the_map() -> None:
    assert sorted({room(m) for m in graph()} - set(ROOMS) - {None}) == []


def test_no_import_runs_back_up() -> None:
    wrong = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        for d in sorted(deps)
        if room(d) not in (None, room(m)) and room(d) not in ROOMS.get(room(m) or "", set())
    ]
    assert wrong == []


def test_no_import_cycle_between_modules() -> None:
    try:
        tuple(TopologicalSorter(graph()).static_order())
    except CycleError as e:
        pytest.fail(f"an import cycle: {' -> '.join(e.args[1])}")
