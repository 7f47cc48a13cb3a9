"""User code at the boundary: plugins loaded by path, and calls into them bounded and isolated.

Rewards (`tidal.rewards`) and environments (`tidal.envs`) both name user code by import path
(`pkg.mod:attr`) or file path (`./file.py:attr`), resolved once at start-up with a one-line
`ConfigError`, and both call into it through `BoundedCalls`: every call, sync or async, is bounded
by a timeout and isolated, so one that raises or hangs is recorded and never crashes the run.
A plugin a fresh process can load again (`plugin_ref`) can be called in a process of a pool
(`BoundedCalls.in_process`), where a call past its timeout is killed rather than left running.
"""

from __future__ import annotations

from tidal.plugins.calls import BoundedCalls, CallResult, call_plugin, is_async, pool_call, start_forkserver
from tidal.plugins.loading import (
    PluginRef,
    build_plugin,
    describe_exception,
    import_object,
    load_plugin,
    plugin_ref,
)

__all__ = [
    "BoundedCalls",
    "build_plugin",
    "call_plugin",
    "CallResult",
    "describe_exception",
    "import_object",
    "is_async",
    "load_plugin",
    "plugin_ref",
    "PluginRef",
    "pool_call",
    "start_forkserver",
]
