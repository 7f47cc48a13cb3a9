"""Faults accounted for whatever their timing: a group scored by a worker whose engine crashes is
trained once; a hung buffer ends a wait with the watchdog's line; a worker that keeps failing ends
the run with the same line wherever its failure is noticed.

Real `tidal train` runs (Ray, DeepSpeed, the tiny MoE) with the real RolloutWorker, each test's
subclass failing at one chosen point (its process killed with SIGKILL, or its engine raising).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import ray

from tidal.config import FilterConfig, load_config
from tidal.driver.dispatch import Dispatcher
from tidal.model.loading import materialize_preset
from tidal.rollout.buffer import TrajectoryBuffer
from tidal.rollout.worker import RolloutWorker
from tidal.runtime import RunError, Stalled, dump_stacks, start_ray
from tidal.stages.train import run_train
from tidal.types import Prompt

pytestmark = pytest.mark.integration
# The actors import tidal, not this test module: its classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def preset(tmp_path_factory: pytest.TempPathFactory) -> None:
    materialize_preset("tiny-qwen3-moe", seed=0)


# ------------------------------------------------------------------- a group trained twice (crash)

STEPS, PER_STEP = 6, 8


def late_put_worker(flag: Path) -> type:
    """The real worker, whose worker 1 has its engine raise once (in one process of the run) right
    after the generate call in which its first group of batch 3 or later ends (begun with that batch,
    or joined by it mid-call): from that group on, the call's groups have ended and wait on the
    scoring thread. They are put exactly when the driver asks the worker's pid, as it does once it
    has noticed the crash and before it hands the worker's groups in flight out again: after the
    driver's last status of the buffer. A worker that settles its scoring before its error reaches
    the driver (`_settle_scoring`) puts them then."""

    class LatePutWorker(RolloutWorker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.crashing = False
            self.release = threading.Event()

        def _put_group(self, work: Any, samples: list, extra: Any) -> None:
            # Which call that is depends on timing: streaming may admit batch 3 into a running call.
            if self.index == 1 and work.batch_id >= 3 and not flag.exists():
                flag.write_text(str(os.getpid()))
                self.crashing = True
            super()._put_group(work, samples, extra)

        def _stream(self, works: list) -> None:
            super()._stream(works)
            if self.crashing:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

        def _score_and_put(self) -> None:
            if self.crashing:
                self.release.wait()
            super()._score_and_put()

        def _settle_scoring(self) -> None:
            self.release.set()
            super()._settle_scoring()

        @ray.method(concurrency_group="control")
        def pid(self) -> int:
            if self.crashing:
                self.release.set()
                wait(list(self._scored))
            return os.getpid()

    return LatePutWorker


def test_groups_scored_when_an_engine_crashes_are_trained_once(tmp_path: Path, ledger_balances) -> None:
    overrides = [
        "name=late",
        f"output_dir={tmp_path}",
        "model.preset=tiny-qwen3-moe",
        "seed=1",
        "data.source.ops=[+]",
        "data.source.eval_size=8",
        "rollout.max_new_tokens=4",
        "rollout.group_size=8",
        f"rollout.prompts_per_step={PER_STEP}",
        "rollout.num_workers=2",
        "rollout.max_staleness=2",
        "trainer.micro_batch_size=64",
        f"train.steps={STEPS}",
        "train.eval_every=0",
        "eval.num_samples=8",
        "eval.max_new_tokens=4",
        "monitor.wandb=disabled",
        "train.save_checkpoint=false",
        # Every group is trained (none filtered), so a second copy would be trained too.
        "filter.zero_variance=false",
        "ray.stall_timeout_s=120",
        # Over broadcast the restart re-forms the group (every member leaves it, the trainer sends again).
        "weight_sync.transport.type=broadcast",
    ]
    cfg = load_config(None, overrides)
    summary = run_train(cfg, worker_cls=late_put_worker(tmp_path / "crashed"))
    assert (tmp_path / "crashed").is_file()
    assert summary["fault/worker_restarts"] == 1
    rows = [json.loads(r) for r in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    ledger_balances(summary, rows, STEPS, PER_STEP)


# ---------------------------------------------------------------------------- every wait is bounded


class HungBuffer(TrajectoryBuffer):
    """The real buffer, whose count of dispatched groups never answers (a buffer actor stuck on a lock)."""

    def dispatched(self, batch_id: int, n: int) -> None:
        time.sleep(3600)


class Prompts:
    def take(self, n: int) -> list[Prompt]:
        return [Prompt(i, {"prompt": "1+1=", "answer": "2"}) for i in range(n)]


def test_a_hung_buffer_ends_the_dispatchers_wait_with_the_watchdogs_line(tmp_path: Path) -> None:
    """...and the stall's dump of every actor's stack shows where the buffer hangs (the slow tier's
    stalled trainer shows it in a whole run)."""
    cfg = load_config(
        None, [f"output_dir={tmp_path}", "ray.stall_timeout_s=2", "monitor.wandb=disabled", "ray.num_cpus=1"]
    )
    start_ray(cfg, log_file=tmp_path / "run.log")  # as a run starts it: actors dump their stacks on SIGUSR1
    try:
        buffer = ray.remote(max_concurrency=4)(HungBuffer).remote(FilterConfig(), 0, 2)
        ray.get(buffer.ledger.remote(), timeout=300)  # up: the watchdog's 2 s time the hang, not the start
        dispatch = Dispatcher(cfg, Prompts(), [], buffer)
        raised: list[BaseException] = []

        def hand_out() -> None:
            try:
                dispatch.batch(1, min_version=0)
            except BaseException as e:
                raised.append(e)

        thread = threading.Thread(target=hand_out, daemon=True)
        t0 = time.monotonic()
        thread.start()
        thread.join(timeout=20)
        assert not thread.is_alive(), "the dispatcher's call to a hung buffer did not end"
        assert isinstance(raised[0], Stalled) and time.monotonic() - t0 < 10, raised
        assert str(raised[0]).startswith("buffer did not answer within ray.stall_timeout_s=2s"), raised
        stacks = dump_stacks(tmp_path / "stacks.txt")
        assert stacks is not None
        hung = stacks.read_text().split("=== HungBuffer (pid")[1].split("\n=== ")[0]
        assert "test_fault_accounting.py" in hung and "in dispatched" in hung, hung
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------- a worker that keeps failing


def failing_worker(procs: Path, where: str) -> type:
    """The real worker, whose first process fails while generating batch 2 or later, and each later
    one fails at `where`, so that the run is past `rollout.max_worker_restarts=1` there:

    - `generate`: killed while generating, as the first;
    - `constructor`: killed while it starts (Ray then has no restart left; the driver's check of the
      new process is what fails);
    - `join_weight_sync`: killed when the driver gives it the weight sync (its rejoin);
    - `pid`: every process's engine raises instead, and the first dies when the driver asks its pid
      before killing it (the restart's check of a live process), the second raises past the limit.
    """

    class FailingWorker(RolloutWorker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.first = not any(procs.iterdir())
            (procs / str(os.getpid())).write_text("")
            if where == "constructor" and not self.first:
                os.kill(os.getpid(), signal.SIGKILL)
            self.crashed = False
            super().__init__(*args, **kwargs)

        def _stream(self, works: list) -> None:
            if works[0].batch_id >= 2:
                if where == "pid":
                    self.crashed = True
                    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
                if self.first or where == "generate":
                    os.kill(os.getpid(), signal.SIGKILL)
            super()._stream(works)

        @ray.method(concurrency_group="control")
        def join_weight_sync(self, group: Any) -> None:
            if where == "join_weight_sync" and not self.first:
                os.kill(os.getpid(), signal.SIGKILL)
            super().join_weight_sync(group)

        @ray.method(concurrency_group="control")
        def pid(self) -> int:
            if self.crashed and self.first:
                os.kill(os.getpid(), signal.SIGKILL)
            return os.getpid()

    return FailingWorker


# Per commit the new process that dies before it answers (the path whose line once depended on timing);
# test_train's dying env fails in `generate` per commit too.
@pytest.mark.parametrize(
    "where",
    [
        # All in the slow tier; per commit test_train.py's worker dies past its restarts.
        pytest.param(w, marks=pytest.mark.slow)
        for w in ("generate", "constructor", "join_weight_sync", "pid")
    ],
)
def test_a_worker_that_keeps_failing_ends_the_run_with_one_line_wherever_it_fails(tmp_path: Path, where: str) -> None:
    procs = tmp_path / "procs"
    procs.mkdir()
    cfg = load_config(
        None,
        [
            f"name={where}",
            f"output_dir={tmp_path / 'runs'}",
            "model.preset=tiny-qwen3-moe",
            "rollout.max_new_tokens=2",
            "rollout.group_size=2",
            "rollout.prompts_per_step=2",
            "rollout.max_worker_restarts=1",
            "train.steps=4",
            "train.eval_every=0",
            "eval.num_samples=2",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
        ],
    )
    with pytest.raises(RunError) as err:
        run_train(cfg, worker_cls=failing_worker(procs, where))
    line = str(err.value)
    assert "\n" not in line, line
    assert line.startswith(
        "rollout worker 0 failed and rollout.max_worker_restarts=1 allows no more restarts; the last failure: "
    ), line
    assert len(list(procs.iterdir())) == 2, sorted(p.name for p in procs.iterdir())


# ------------------------------------------------------------ every worker down at the last evaluation


def dying_at_weights(procs: Path, version: int) -> type:
    """The real worker, whose first process (of each worker) is killed when it is offered the weights of
    `version`: both die as the driver asks the last evaluation, which then waits on their restarts."""

    class DyingWorker(RolloutWorker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.first = not any(procs.glob(f"{self.index}-*"))
            (procs / f"{self.index}-{os.getpid()}").write_text("")

        @ray.method(concurrency_group="control")
        def offer_weights(self, handle: Any) -> Any:
            if self.first and handle.version == version:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().offer_weights(handle)

    return DyingWorker


@pytest.mark.slow  # a race at the run's last step; per commit, test_faults' chaos run restarts killed workers
def test_every_worker_dying_as_the_last_evaluation_is_asked_is_restarted_and_the_run_ends(tmp_path: Path) -> None:
    """The evaluation goes to a worker being restarted, and waits for its serving loop: the driver
    brings the new processes in while it waits (it once waited out `ray.stall_timeout_s` instead, a
    hang of half an hour with the default)."""
    procs = tmp_path / "procs"
    procs.mkdir()
    cfg = load_config(
        None,
        [
            "name=both",
            f"output_dir={tmp_path / 'runs'}",
            "model.preset=tiny-qwen3-moe",
            "rollout.max_new_tokens=2",
            "rollout.group_size=2",
            "rollout.prompts_per_step=2",
            "rollout.num_workers=2",
            "train.steps=2",
            "train.eval_every=0",
            "filter.zero_variance=false",  # every step trains: the last publish is version 2
            "eval.num_samples=2",
            "eval.max_new_tokens=2",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
            "ray.stall_timeout_s=300",
        ],
    )
    summary = run_train(cfg, worker_cls=dying_at_weights(procs, version=2))
    assert summary["fault/worker_restarts"] == 2
    assert sorted(p.name.split("-")[0] for p in procs.iterdir()) == ["0", "0", "1", "1"]
    assert summary["eval/version"] == 2, summary
