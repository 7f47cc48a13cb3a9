"""Snapshot files a vLLM worker writes for its engine's processes (tensor parallelism) do not outlive
the worker: a worker killed while it wrote or loaded one leaves its directory, in RAM, and the next
engine to start or load removes it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from tidal.rollout.engines.vllm import SHM_PREFIX, remove_stale_snapshot_files, write_parts
from tidal.rollout.engines.vllm_ext import _streamed

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


def _read_all(d: str, parts: int, readers: int) -> list[dict[str, torch.Tensor] | Exception]:
    """What each of `readers` engine ranks reads of a stream of `parts` (as vllm_ext does), side by side."""
    got: list[dict[str, torch.Tensor] | Exception] = [{} for _ in range(readers)]

    def read(rank: int) -> None:
        try:
            got[rank] = dict(_streamed(d, parts, 30.0, rank))
        except Exception as e:
            got[rank] = e

    threads = [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def test_a_snapshot_streams_to_every_rank_a_few_buckets_at_a_time(tmp_path: Path) -> None:
    """Two tensor-parallel ranks read six buckets as they are written: each gets every tensor, and
    shared memory never holds more than two buckets (the whole snapshot is never written there)."""
    buckets = [{f"w{i}.{j}": torch.full((64,), float(i * 10 + j)) for j in range(3)} for i in range(6)]
    stop, peak = threading.Event(), [0]
    writer = threading.Thread(target=write_parts, args=(str(tmp_path), buckets, 2, stop, peak))
    writer.start()
    got = _read_all(str(tmp_path), len(buckets), readers=2)
    writer.join(60)
    want = {k: v for b in buckets for k, v in b.items()}
    for rank in got:
        assert isinstance(rank, dict) and rank.keys() == want.keys()
        assert all(torch.equal(rank[k], want[k]) for k in want)
    assert peak[0] == 2


def test_a_part_that_cannot_be_written_fails_the_load_instead_of_hanging_it(tmp_path: Path) -> None:
    buckets = [{"a": torch.zeros(4)}, {"b": "not a tensor"}, {"c": torch.zeros(4)}]
    stop, peak = threading.Event(), [0]
    writer = threading.Thread(target=write_parts, args=(str(tmp_path), buckets, 1, stop, peak))
    writer.start()
    (got,) = _read_all(str(tmp_path), len(buckets), readers=1)
    writer.join(60)
    assert isinstance(got, RuntimeError) and "could not write weight part 1" in str(got)
