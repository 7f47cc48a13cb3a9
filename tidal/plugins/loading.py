"""User code by path: a plugin named by import path (`pkg.mod:attr`) or file path (`./file.py:attr`),
resolved once at start-up with a one-line `ConfigError`, and loaded again by a fresh process
(`plugin_ref`, `load_plugin`)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from tidal.config import ConfigError

T = TypeVar("T")


def describe_exception(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line (a message's newlines would break one-line errors and logs)."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ------------------------------------------------------------------------------------------- loading


def build_plugin(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    """The user's class `cls` built with `kwargs` from the YAML; what it raises is one `ConfigError`
    line naming `where` (`envs[0].path '...'`)."""
    try:
        return cls(**kwargs)
    except Exception as e:
        raise ConfigError(
            f"{where}: building {cls.__name__} with kwargs {kwargs} raised {describe_exception(e)}"
        ) from None


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


_FILE_MODULE_PREFIX = "_tidal_plugin_"
"""Module names of plugins loaded from a file (`_tidal_plugin_<stem>_<digest of the path>`)."""


def _load_file(source: str, where: str) -> ModuleType:
    file = Path(source).expanduser()
    if not file.is_file():
        raise ConfigError(f"{where}: file {source} not found (looked for {file.resolve()})")
    resolved = file.resolve()
    # Unique per file, so two `reward.py` from different folders do not replace each other; the same
    # file named by two specs is loaded once.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    mod_name = f"{_FILE_MODULE_PREFIX}{stem}_{digest}"
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


# ------------------------------------------------------------------------------ plugins in processes


@dataclass
class PluginRef:
    """How a fresh process loads a plugin again: the path `import_object` resolves (a file plugin's
    absolute), and the kwargs to build it with when it names a class."""

    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    """Of the object built, this method is the plugin (an env's `step`)."""


def plugin_ref(obj: Any, kwargs: dict[str, Any] | None = None) -> PluginRef | None:
    """The ref a fresh process can load `obj` by, None when it cannot load the same object.

    `obj` is a function or class defined at the top level of a module that a fresh process imports
    by name or, for a plugin loaded from a file, from that file; `kwargs` build a class. A closure,
    lambda, bound method, instance, `__main__`'s objects or a module made in memory have no ref.
    """
    if not (inspect.isfunction(obj) or isinstance(obj, type)):
        return None
    module = sys.modules.get(obj.__module__)
    if module is None or getattr(module, obj.__qualname__, None) is not obj:  # nested, local or replaced
        return None
    if module.__name__.startswith(_FILE_MODULE_PREFIX) and getattr(module, "__file__", None):
        source = module.__file__
    elif module.__name__ == "__main__" or module.__spec__ is None:  # a child has another __main__, or none
        return None
    else:
        source = module.__name__
    return PluginRef(f"{source}:{obj.__qualname__}", dict(kwargs or {}))


_loaded: dict[str, Callable[..., Any]] = {}
"""This process's plugins by ref (`load_plugin`): a reward process builds each one once."""


def load_plugin(ref: PluginRef) -> Callable[..., Any]:
    """The plugin `ref` names, built with its kwargs if it is a class (once per process: an env's
    methods share one instance), or that object's `method`."""
    key = repr((ref.path, ref.kwargs))
    if key not in _loaded:
        obj = import_object(ref.path, f"plugin {ref.path!r}")
        _loaded[key] = obj(**ref.kwargs) if isinstance(obj, type) else obj
    return _loaded[key] if ref.method is None else getattr(_loaded[key], ref.method)
