"""Resolve `rewards.functions` once at start-up: built-ins by name, user code by import or file path.

Every failure is a one-line `ConfigError` that names the spec (`rewards.functions[i].path '...'`),
what was looked for and where.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tidal.config import ConfigError, RewardsConfig, RewardSpec
from tidal.plugins import build_plugin, import_object
from tidal.rewards.base import is_trl_style
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


def _finish(name: str, obj: Any, kwargs: dict[str, Any], where: str) -> tuple[str, Callable[..., Any], dict[str, Any]]:
    kwargs = dict(kwargs)
    if isinstance(obj, type):
        fn = build_plugin(obj, kwargs, where)
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
