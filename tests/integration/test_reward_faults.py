"""Reward calls (and env calls, with `isolation: process`) that hang are killed with their process,
and transient failures are retried.

Rewards here are loaded from files, so they run in the scorer's process pool: a module-level
counter would live in a child process, so attempts are counted in files.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

from tidal.config import DataConfig, EnvSpec, RewardsConfig, RewardSpec
from tidal.rewards import RewardScorer
from tidal.rollout.env_runtime import build_runtimes
from tidal.telemetry.metrics import values
from tidal.types import Sample

pytestmark = pytest.mark.integration

SPIN = """
import os
from pathlib import Path

def spin(sample, row, pid_file):
    if row["answer"] == "spin":
        Path(pid_file).write_text(str(os.getpid()))
        while True:
            pass
    return float(sample.text == row["answer"])
"""

FLAKY = """
from pathlib import Path

import httpx

def flaky(sample, row, log_dir):
    log = Path(log_dir) / row["id"]
    with log.open("a") as f:
        f.write("x")
    attempt = len(log.read_text())
    mode = row["mode"]
    if mode == "down" or (mode == "blip" and attempt == 1):
        raise ConnectionRefusedError(111, "Connection refused")
    if mode == "http" and attempt == 1:
        raise httpx.HTTPStatusError(
            "503", request=httpx.Request("POST", "http://judge"), response=httpx.Response(503)
        )
    if mode == "http404":
        raise httpx.HTTPStatusError(
            "404", request=httpx.Request("POST", "http://judge"), response=httpx.Response(404)
        )
    if mode == "bad":
        raise ValueError("bad row")
    return 1.0
"""

CONTAINED = """
import math
import os
import sys

from tidal.rewards import RewardResult

class Judge:
    def __init__(self, bonus):
        self.bonus = bonus

    def __call__(self, sample, row):
        kind = row["kind"]
        if kind == "exit":
            sys.exit(3)
        if kind == "crash":
            os._exit(1)
        if kind == "nan":
            return math.nan
        if kind == "gen":
            return (x for x in [1.0])
        if kind == "sub":
            return RewardResult(self.bonus, {"length": float(len(sample.text))})
        return self.bonus
"""


def make_sample(text: str = "19", **row: Any) -> Sample:
    return Sample(0, [1], [2], [1], [-0.1], "stop", 0, [0], text=text, row={"prompt": "12+7=", **row})


def forkserver_children(me: psutil.Process) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(this process's forkserver, the processes it forked): the reward pools' processes. Other
    children (a Ray runtime or a wandb service an earlier test of the session left) are not theirs."""
    servers = [p for p in me.children() if "forkserver" in " ".join(p.cmdline())]
    return servers, [c for s in servers for c in s.children()]


def cpu_s(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of `processes` (those still there)."""
    used = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used += t.user + t.system
    return used


def test_spinning_reward_is_killed_and_its_process_replaced(tmp_path: Path) -> None:
    (tmp_path / "spin.py").write_text(SPIN)
    pid_file = tmp_path / "pid"
    spec = RewardSpec(path=f"{tmp_path}/spin.py:spin", kwargs={"pid_file": str(pid_file)})
    cfg = RewardsConfig(functions=[spec], timeout_s=1.0, retries=1, failure_reward=-1.0)
    me = psutil.Process()
    others = {p.pid for p in forkserver_children(me)[1]}  # earlier tests' pools, if any are left
    with RewardScorer(cfg, max_threads=2) as scorer:
        assert values(scorer.score([make_sample(answer="19")]))["reward/spin"] == 1.0  # the pool is up
        hung, fine = make_sample(answer="spin"), make_sample(answer="19")
        start = time.perf_counter()
        metrics = values(scorer.score([hung, fine]))
        assert time.perf_counter() - start < 15.0  # two attempts of 1 s each, then the kill
        assert hung.reward == -1.0 and hung.reward_errors == ["spin: timed out after 1.0s (2 attempts)"]
        assert fine.reward == 1.0 and fine.reward_errors == []
        assert metrics["reward/failed_timeout"] == 1.0 and metrics["reward/retried"] == 1.0
        # The second attempt's process was killed (the first one's too), not left spinning.
        spun = int(pid_file.read_text())
        assert spun != os.getpid()
        assert not psutil.pid_exists(spun) or psutil.Process(spun).status() == psutil.STATUS_ZOMBIE
        # The pool replaced it and scores on.
        later = [make_sample(answer="19"), make_sample("20", answer="19")]
        metrics = values(scorer.score(later))
        assert [s.reward for s in later] == [1.0, 0.0] and metrics["reward/failed"] == 0.0
        # Nothing burns a core now: neither the pool's processes nor a thread of this process (where
        # an abandoned call would have kept spinning before).
        servers, forked = forkserver_children(me)
        workers = [w for w in forked if w.pid not in others]
        assert len(servers) == 1 and len(workers) == 2  # max_threads, within the CPU count
        pool_before, own_before = cpu_s(servers + workers), sum(me.cpu_times()[:2])
        time.sleep(1.0)
        assert cpu_s(servers + workers) - pool_before < 0.2
        assert sum(me.cpu_times()[:2]) - own_before < 0.2
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # closed with the scorer


def attempts(log_dir: Path, row_id: str) -> int:
    return len((log_dir / row_id).read_text())


def test_transient_failures_are_retried_others_are_not(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    log_dir = tmp_path / "attempts"
    log_dir.mkdir()
    spec = RewardSpec(path=f"{tmp_path}/flaky.py:flaky", kwargs={"log_dir": str(log_dir)})
    cfg = RewardsConfig(functions=[spec], timeout_s=5.0, retries=2, failure_reward=-1.0)
    modes = ["blip", "blip", "http", "down", "bad", "http404", "fine"]
    samples = [make_sample(id=f"{mode}{i}", mode=mode) for i, mode in enumerate(modes)]
    with RewardScorer(cfg) as scorer:
        metrics = values(scorer.score(samples))
    assert [attempts(log_dir, s.row["id"]) for s in samples] == [2, 2, 2, 3, 1, 1, 1]
    assert [s.reward for s in samples] == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
    assert [s.reward_errors for s in samples[:3] + samples[-1:]] == [[], [], [], []]
    assert samples[3].reward_errors == [
        "flaky: raised ConnectionRefusedError: [Errno 111] Connection refused (3 attempts)"
    ]
    assert samples[4].reward_errors == ["flaky: raised ValueError: bad row"]
    assert samples[5].reward_errors == ["flaky: raised HTTPStatusError: 404"]
    assert metrics["reward/retried"] == 4.0  # the blips, the 503 and the outage; not the ValueError, not the 404
    assert metrics["reward/failed"] == 3.0 and metrics["reward/failed_exception"] == 3.0

    # retries: 0 fails a blip at once.
    for f in log_dir.iterdir():
        f.unlink()
    no_retry = RewardsConfig(functions=[spec], timeout_s=5.0, retries=0, failure_reward=-1.0)
    sample = make_sample(id="again", mode="blip")
    with RewardScorer(no_retry) as scorer:
        metrics = values(scorer.score([sample]))
    assert attempts(log_dir, "again") == 1 and sample.reward == -1.0
    assert metrics["reward/retried"] == 0.0 and metrics["reward/failed_exception"] == 1.0


def test_results_and_failures_in_a_reward_process_are_as_in_threads(tmp_path: Path) -> None:
    (tmp_path / "judge.py").write_text(CONTAINED)
    cfg = RewardsConfig(
        functions=[RewardSpec(path=f"{tmp_path}/judge.py:Judge", kwargs={"bonus": 0.5})], failure_reward=-1.0
    )
    kinds = ["plain", "sub", "exit", "nan", "gen", "crash", "plain"]
    samples = [make_sample("abc", kind=k) for k in kinds]
    with RewardScorer(cfg) as scorer:
        metrics = values(scorer.score(samples))
        again = make_sample(kind="plain")
        scorer.score([again])  # the process that crashed was replaced
    assert [s.scores["Judge"] for s in samples] == [0.5, 0.5, -1.0, -1.0, -1.0, -1.0, 0.5]
    assert samples[1].scores["Judge/length"] == 3.0
    assert samples[2].reward_errors == ["Judge: raised SystemExit: 3"]
    assert samples[3].reward_errors == ["Judge: returned NaN"]
    assert samples[4].reward_errors == ["Judge: returned generator, expected a number or RewardResult"]
    [crashed] = samples[5].reward_errors
    assert crashed.startswith("Judge: raised ProcessExpired: Abnormal termination")
    assert again.reward == 0.5
    assert metrics["reward/failed_exception"] == 2.0 and metrics["reward/failed_nan"] == 1.0
    assert metrics["reward/failed_type"] == 1.0 and metrics["reward/retried"] == 0.0


ISOLATED_ENV = """
import os
from pathlib import Path

from tidal.envs import MultiTurnEnv, Step

class Counter(MultiTurnEnv):
    def __init__(self, parent_pid, pid_file):
        self.parent_pid, self.pid_file = parent_pid, pid_file

    def reset(self, row):
        return {"turns": [], "pid": os.getpid()}

    def step(self, state, text):
        if text == "spin":
            Path(self.pid_file).write_text(str(os.getpid()))
            while True:
                pass
        if text == "bad":
            raise ValueError("bad turn")
        state["turns"].append(text)  # changed in place, as a user's env does
        return Step(observation=f"turn {len(state['turns'])}", done=len(state["turns"]) == 2)

    def score(self, sample, row):
        return float(os.getpid() != self.parent_pid)
"""


def test_an_isolated_env_runs_in_processes_and_a_spinning_step_is_killed(tmp_path: Path) -> None:
    """`isolation: process`: reset, step and score run in the pool's processes, a state `step` changes
    in place is the caller's again, a step that spins is killed at the timeout (its core freed) and
    the pool goes on; a step that raises is recorded as in a thread."""
    (tmp_path / "env.py").write_text(ISOLATED_ENV)
    pid_file = tmp_path / "pid"
    spec = EnvSpec(
        path=f"{tmp_path}/env.py:Counter",
        isolation="process",
        kwargs={"parent_pid": os.getpid(), "pid_file": str(pid_file)},
    )
    rt = build_runtimes([spec], RewardsConfig(timeout_s=2.0), DataConfig())["Counter"]
    calls = rt.scorer.calls
    try:
        reset, step = rt.method("reset"), rt.method("step")
        states = [r.value for r in calls.run([partial(reset, {"prompt": "p"}) for _ in range(2)])]
        assert all(s["pid"] != os.getpid() and s["turns"] == [] for s in states), states
        first = calls.run([partial(step, states[0], "a"), partial(step, states[1], "bad")])
        assert first[0].ok and first[0].value.observation == "turn 1" and states[0]["turns"] == ["a"]
        assert not first[1].ok and first[1].reason == "raised ValueError: bad turn", first[1]
        start = time.perf_counter()
        second = calls.run([partial(step, states[0], "b"), partial(step, states[1], "spin")])
        assert time.perf_counter() - start < 15.0
        assert second[0].ok and second[0].value.done and states[0]["turns"] == ["a", "b"]
        assert not second[1].ok and second[1].reason == "timed out after 2.0s", second[1]
        spun = int(pid_file.read_text())
        time.sleep(0.5)
        assert not psutil.pid_exists(spun) or psutil.Process(spun).status() == psutil.STATUS_ZOMBIE
        sample = make_sample()
        rt.scorer.score([sample])  # the env's score, in a process of the pool that replaced the killed one
        assert sample.reward == 1.0 and sample.reward_errors == [], sample.reward_errors
    finally:
        rt.scorer.close()
