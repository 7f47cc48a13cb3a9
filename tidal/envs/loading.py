"""Resolve `envs` once at start-up: built-ins by name, user envs by import or file path.

Every failure is a one-line `ConfigError` naming the spec (`envs[i].path '...'`), what was looked for
and where; the class is built with its kwargs here, so a bad kwarg fails before any actor starts.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from tidal.config import ConfigError, EnvSpec
from tidal.envs.agent import AgentEnv
from tidal.envs.base import Env, MultiTurnEnv
from tidal.envs.builtins import BUILTIN_ENVS
from tidal.envs.verifiers_env import VerifiersAgent
from tidal.plugins import build_plugin, describe_exception, import_object, plugin_ref


def env_label(spec: EnvSpec) -> str:
    """The env's name in metrics: `label`, else the built-in name, else the class name."""
    if spec.label is not None:
        return spec.label
    if spec.name is not None:
        return spec.name
    if spec.verifiers is not None:
        return Path(spec.verifiers).stem if spec.verifiers.endswith(".py") else spec.verifiers
    path = spec.path or spec.agent
    assert path is not None
    return path.rpartition(":")[2]


def resolve_env(spec: EnvSpec, index: int) -> Env:
    """The env instance of `envs[index]`: its class built with the spec's kwargs (an agent: an
    `AgentEnv` of its function)."""
    if spec.agent is not None:
        return AgentEnv.load(spec.agent, spec.kwargs, f"envs[{index}].agent {spec.agent!r}")
    if spec.verifiers is not None:
        agent = VerifiersAgent(spec.verifiers, spec.kwargs, f"envs[{index}].verifiers {spec.verifiers!r}")
        return AgentEnv(agent.run, {}, agent)
    if spec.name is not None:
        where = f"envs[{index}].name {spec.name!r}"
        if spec.name not in BUILTIN_ENVS:
            raise ConfigError(f"{where} is not a built-in environment (known: {', '.join(sorted(BUILTIN_ENVS))})")
        cls: object = BUILTIN_ENVS[spec.name]
    else:
        assert spec.path is not None  # EnvSpec validates that exactly one of name / path is set.
        where = f"envs[{index}].path {spec.path!r}"
        cls = import_object(spec.path, where)
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise ConfigError(
            f"{where}: {getattr(cls, '__name__', cls)!r} is not a tidal.envs.Env subclass; subclass "
            "Env (single turn: prompt, score) or MultiTurnEnv (reset, step)"
        )
    env = build_plugin(cls, spec.kwargs, where)
    if isinstance(env, MultiTurnEnv) and (not isinstance(env.max_turns, int) or env.max_turns < 1):
        raise ConfigError(f"{where}: max_turns must be a positive int, got {env.max_turns!r}")
    if spec.isolation == "process":
        _check_isolable(cls, spec, f"envs[{index}]")
    return env


def _check_isolable(cls: type, spec: EnvSpec, where: str) -> None:
    """`isolation: process` builds the env again in each pool process: from its class's ref and kwargs."""
    if plugin_ref(cls, spec.kwargs) is None:
        raise ConfigError(
            f"{where}: isolation: process needs a class a fresh process can import (defined at "
            f"the top level of a module or file, not in __main__), {cls.__name__} is not"
        )
    try:
        pickle.dumps(spec.kwargs)
    except Exception as e:
        raise ConfigError(
            f"{where}: isolation: process sends the kwargs to each pool process, and they do not "
            f"pickle: {describe_exception(e)}"
        ) from None


def resolve_envs(specs: list[EnvSpec]) -> dict[str, Env]:
    """Every env of the run by label, in config order; labels must be distinct."""
    out: dict[str, Env] = {}
    for i, spec in enumerate(specs):
        label = env_label(spec)
        if label in out:
            raise ConfigError(f"envs[{i}]: label {label!r} is taken by an earlier env; give each a distinct `label`")
        out[label] = resolve_env(spec, i)
    return out
