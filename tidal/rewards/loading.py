"""Resolve `rewards.functions` once at start-up: built-ins by name, user code by import or file path.

Every failure is a one-line `ConfigError` that names the spec (`rewards.functions[i].path '...'`),
what was looked for and where.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from tidal.config import ConfigError, RewardsConfig, RewardSpec
from tidal.rewards.base import describe_exception, is_trl_style
from tidal.rewards.builtins import BUILTINS

# A reward named like one of the scorer's own metrics would overwrite it under `reward/<name>`.
_RESERVED_NAMES = frozenset(
    {"mean", "std", "failed", "failed_timeout", "failed_exception", "failed_nan", "failed_type", "score_time_s"}
)


def resolve_reward(spec: RewardSpec, index: int) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    """(name for logging, the callable, the kwargs to pass it on every call) of `rewards.functions[index]`.

    A class is built once with the spec's kwargs; its instance is the callable and gets no kwargs per call.
    """
    if spec.name is not None:
        where = f"rewards.functions[{index}].name {spec.name!r}"
        if spec.name not in BUILTINS:
            raise ConfigError(f"{where} is not a built-in reward (known: {', '.join(sorted(BUILTINS))})")
        return _finish(spec.name, BUILTINS[spec.name], spec.kwargs, where)
    assert spec.path is not None  # RewardSpec validates that exactly one of name / path is set.
    where = f"rewards.functions[{index}].path {spec.path!r}"
    obj = import_object(spec.path, where)
    return _finish(getattr(obj, "__name__", type(obj).__name__), obj, spec.kwargs, where)


def resolve_rewards(cfg: RewardsConfig) -> list[tuple[str, Callable[..., Any], dict[str, Any]]]:
    """`resolve_reward` of every spec, in order, with unique names (a repeated name gets `_1`, `_2`, ...)."""
    out = []
    taken = set(_RESERVED_NAMES)
    for i, spec in enumerate(cfg.functions):
        name, fn, kwargs = resolve_reward(spec, i)
        unique, k = name, 0
        while unique in taken:
            k += 1
            unique = f"{name}_{k}"
        taken.add(unique)
        out.append((unique, fn, kwargs))
    return out


def import_object(path: str, where: str) -> Any:
    """The object named by `pkg.mod:attr` (imported) or `./dir/file.py:attr` / `/abs/file.py:attr` (loaded).

    `where` prefixes error messages, e.g. `rewards.functions[1].path './my_reward.py:score'`.
    """
    source, sep, attr = path.rpartition(":")
    if not sep or not source or not attr:
        raise ConfigError(f"{where}: expected 'pkg.module:function' or './file.py:function' (missing ':' separator)")
    if not attr.isidentifier():
        raise ConfigError(f"{where}: {attr!r} after ':' is not a Python name")
    is_file = "/" in source or source.endswith(".py")
    module = _load_file(source, where) if is_file else _import_module(source, where)
    if not hasattr(module, attr):
        own = sorted(
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
        )
        listing = f"it has: {', '.join(own[:20])}{', ...' if len(own) > 20 else ''}" if own else "it defines none"
        raise ConfigError(f"{where}: module {source!r} has no attribute {attr!r} ({listing})")
    return getattr(module, attr)


def _import_module(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only the module itself (or a parent package) missing is "not found"; a missing import
        # inside the user's module is their error and is reported as such below.
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"{where}: module {e.name!r} not found on sys.path (for a file, write './path/file.py:fn')"
            ) from None
        raise ConfigError(f"{where}: importing {name} raised {describe_exception(e)}") from None
    except Exception as e:
        raise ConfigError(f"{where}: importing {name} raised {describe_exception(e)}") from None


def _load_file(source: str, where: str) -> ModuleType:
    file = Path(source).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: file {source} not found (looked for {file.resolve()})")
    resolved = file.resolve()
    # Unique per file, so two `reward.py` from different folders do not replace each other; the same
    # file named by two specs is loaded once.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    mod_name = f"_tidal_reward_{stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: cannot load {source} as a Python module (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pickling look a module up by name.
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # SyntaxError, a failing import, sys.exit(): one line for the user.
        del sys.modules[mod_name]
        raise ConfigError(f"{where}: importing {source} raised {describe_exception(e)}") from None
    return module


def _finish(name: str, obj: Any, kwargs: dict[str, Any], where: str) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    kwargs = dict(kwargs)
    if isinstance(obj, type):
        try:
            fn = obj(**kwargs)
        except Exception as e:
            raise ConfigError(
                f"{where}: building {obj.__name__} with kwargs {kwargs} raised {describe_exception(e)}"
            ) from None
        if not callable(fn):
            raise ConfigError(
                f"{where}: instances of class {obj.__name__} are not callable (define __call__(sample, row))"
            )
        kwargs = {}
    elif callable(obj):
        fn = obj
    else:
        raise ConfigError(f"{where} is not callable (it is of type {type(obj).__name__})")
    if is_trl_style(fn):  # called with the batch's columns, which only the data knows
        return name, fn, kwargs
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # Some C callables have none; their first call will tell.
        return name, fn, kwargs
    try:
        signature.bind(None, None, **kwargs)
    except TypeError as e:
        # Checked now so that a typo in a kwarg fails the run at start-up, not every call.
        raise ConfigError(f"{where}: cannot be called as fn(sample, row, **{kwargs}): {e}") from None
    return name, fn, kwargs
