"""Environments: the protocol (single- and multi-turn), built-ins, and loading user envs by path.

A user env is a small class in the user's own file, named in YAML by file or import path; see
`tidal.envs.base` for the protocol and `examples/custom_env/` for a complete one.
"""

from tidal.envs.base import Env, MultiTurnEnv, Step

__all__ = ["Env", "MultiTurnEnv", "Step"]
