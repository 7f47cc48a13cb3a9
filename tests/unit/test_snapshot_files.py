"""Snapshot files a vLLM worker writes for its engine's processes (tensor parallelism) do not outlive
the worker: a worker killed while it wrote or loaded one leaves its directory, in RAM, and the next
engine to start or load removes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.rollout.engines.vllm import SHM_PREFIX, remove_stale_snapshot_files

pytestmark = pytest.mark.unit


def test_a_dead_workers_snapshot_files_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    # A process that has ended: its id is free (a killed worker's, as far as the files can tell).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{SHM_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{SHM_PREFIX}{os.getpid()}-def"
    other = tmp_path / "someone-elses"
    for d in (stale, live, other):
        d.mkdir()
        (d / "part-00000.safetensors").write_bytes(b"x" * 1024)
    assert remove_stale_snapshot_files(str(tmp_path)) == [stale]
    assert not stale.exists() and live.is_dir() and other.is_dir()
