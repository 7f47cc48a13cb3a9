"""Loading a run config: YAML, dotted `key=value` overrides, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tidal.config.base import ConfigError, _with_default_tag
from tidal.config.run import RunConfig

# --------------------------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings into (path, value); values are parsed as YAML (`1e-3`, `true`, `[1, 2]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string; users mean a number
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf") else value
            except ValueError:
                pass
        parsed.append((key, value))
    return parsed


def _dotted_loc(loc: tuple[int | str, ...], tree: Any) -> str:
    """The user's key path of an error location, without the union tags pydantic inserts."""
    parts, node = [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # a discriminated union's tag, not a key the user wrote
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts).replace(".[", "[")


def _format_error(err: ValidationError, tree: dict[str, Any]) -> str:
    unknown, parts = [], []
    for e in err.errors():
        loc = _dotted_loc(e["loc"], tree)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            unknown.append(f"'{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing config key '{loc}'")
        elif e["type"] == "union_tag_invalid":
            parts.append(f"config key '{loc}.type': {msg}")
        elif isinstance(e.get("input"), dict) or not loc:
            parts.append(msg)
        else:
            parts.append(f"config key '{loc}': {msg} (got {e.get('input')!r})")
    if unknown:
        parts.insert(
            0,
            f"unknown config key {', '.join(unknown)} (check the spelling; `tidal check` prints the known keys)",
        )
    return "; ".join(parts)


_TAGGED_SECTIONS = {
    ("data", "source"): "arithmetic",
    ("algorithm", "loss", "correction"): "tis",
    ("algorithm", "loss", "trust_region"): "clip",
    ("weight_sync", "transport"): "object_store",
}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults when `path` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of config sections, got {type(loaded).__name__}")
        tree = loaded or {}
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_dotted(tree, key, value)
    # A preset override replaces a path from the file (and vice versa), as a user expects.
    model = tree.get("model")
    if isinstance(model, dict) and parsed:
        keys = {k for k, _ in parsed}
        if "model.preset" in keys and "model.path" not in keys:
            model.pop("path", None)
        if "model.path" in keys and "model.preset" not in keys:
            model.pop("preset", None)
    for path, tag in _TAGGED_SECTIONS.items():
        parent = tree
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if isinstance(parent, dict):  # the tag is made explicit so error paths can strip it
            parent.update(_with_default_tag(parent, path[-1], tag))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, tree)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
