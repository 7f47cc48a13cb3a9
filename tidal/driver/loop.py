"""The RL driver's loop: dispatch, train, publish, evaluate, log, and checkpoint, step by step.

Workers generate rollout batches ahead of the trainer as far as the staleness bound allows
(`may_dispatch`); step s trains the oldest ready groups (batch s in deterministic mode). With
max_staleness 0 rollout and training take turns (on-policy). Held-out evaluations run on worker 0
between its generate calls, without stalling the loop.

A checkpoint step (`train.checkpoint_every`, or the step a SIGTERM / SIGINT arrives in) publishes
the trainer's weights, lets every group in flight land in the buffer, and writes the checkpoint
beside the next batches (`checkpoints`). Publishing is `publishing`'s, the workers' health the
supervisor's (`supervisor`), which prompts go where the dispatcher's (`dispatch`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from functools import partial
from types import FrameType
from typing import Any

from tidal.config import RunConfig
from tidal.driver.checkpoints import Checkpoints
from tidal.driver.dispatch import Dispatcher, may_dispatch
from tidal.driver.publishing import Publishing
from tidal.driver.staleness import StalenessBound
from tidal.driver.supervisor import Supervisor, WorkerLost
from tidal.driver.trackers import EvalTracker
from tidal.runtime import RunError, wait_for
from tidal.telemetry.metrics import largest, merge, values
from tidal.telemetry.monitor import Monitor
from tidal.trainer.group import TrainerGroup
from tidal.types import Prompt, StepResult

log = logging.getLogger(__name__)


class StopSignal:
    """While entered (in the main thread): SIGTERM or SIGINT asks the run to stop at the end of the
    step, with a checkpoint; a second one stops it at once."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        log.warning(
            "%s: stopping at the end of this step, with a checkpoint (send it again to stop at once)", self.name
        )


class Driver:
    """The RL loop of one run (see the module doc). Building it starts nothing; `run` does."""

    def __init__(
        self,
        cfg: RunConfig,
        sampler: Any,
        eval_rows: list[Prompt],
        workers: list[Any],
        buffer: Any,
        trainer: TrainerGroup,
        monitor: Monitor,
        stop: StopSignal,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.sampler, self.workers, self.buffer = cfg, sampler, workers, buffer
        self.trainer, self.monitor, self.stop = trainer, monitor, stop
        self.get = partial(wait_for, timeout_s=cfg.ray.stall_timeout_s)
        self.bound = StalenessBound(cfg.rollout.max_staleness, cfg.rollout.adaptive_staleness)
        self.dispatch = Dispatcher(cfg, sampler, workers, buffer)
        self.publishing = Publishing(cfg, trainer, workers, self.get)
        self.supervisor = Supervisor(cfg, self.dispatch, reform=self.publishing.reform)
        self.offers = self.publishing.attach(self.supervisor)
        self.evals = EvalTracker(self.supervisor, eval_rows, cfg.ray.stall_timeout_s)
        self.checkpoints = Checkpoints(cfg, trainer, self.get)
        self.step = 0  # the last step done
        self.trained = 0  # the last step the trainer took (a step fails after that, in its publish)
        self.version = 0  # the trainer's
        self.next_batch = 1
        self.before: dict[str, float] = {}  # held-out metrics before training
        self.save_due = False  # decided once per step, before its publish: the checkpoint needs that publish
        self.resumed = resumed is not None
        if resumed is not None:
            self._restore(resumed)
        self.schedule: Any = None
        """Each step's groups as trained (group, batch, worker, generating versions): schedule.jsonl."""

    @property
    def published(self) -> int:
        """The newest version offered to the workers."""
        return self.publishing.published

    def state(self) -> dict[str, Any]:
        """The driver's part of a checkpoint (the buffer's and the trainer's are added to it)."""
        return {
            "step": self.step,
            "version": self.version,
            "published": self.published,
            "next_batch": self.next_batch,
            "sampler": self.sampler.state(),
            "dispatch": {**self.dispatch.state(), "restarts": self.supervisor.restarts},
            "bound": (self.bound.rate, self.bound.bound),
            "before": self.before,
            "wandb_id": self.monitor.wandb_id,
            "config": self.cfg.model_dump(mode="json"),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.version, self.publishing.published = state["step"], state["version"], state["published"]
        self.trained = self.step
        self.next_batch, self.before = state["next_batch"], state["before"]
        self.sampler.load_state(state["sampler"])
        self.dispatch.load_state(state["dispatch"])
        self.supervisor.restarts = state["dispatch"].get("restarts", self.supervisor.restarts)
        self.bound.rate, self.bound.bound = state["bound"]

    def run(self, warm: dict[str, Any]) -> dict[str, Any]:
        """Steps from the one after `self.step` to `train.steps` (or a stop signal); the summary."""
        self.schedule = (self.cfg.run_dir / "schedule.jsonl").open("a" if self.resumed else "w", buffering=1)
        self.supervisor.start()
        t_loop = t_prev = t_end = time.perf_counter()
        first_eval_s = 0.0
        if self.step == 0:
            self.evals.request(0)  # first in worker 0's queue: the weights it starts with
        else:  # resumed: the workers start from the initial policy
            self.publishing.publish()
            self.dispatch.resubmit(self.published)
        last: dict[str, float] = {}
        try:
            for step in range(self.step + 1, self.cfg.train.steps + 1):
                self.step = step
                self._dispatch()
                if step == 1:
                    self.before = values((self.evals.collect(wait=True) or [{}])[-1])
                    first_eval_s = time.perf_counter() - t_loop
                    warm_row = {f"warm_start/{k}": v for k, v in warm.items() if isinstance(v, float)}
                    self.monitor.log({**self.before, **warm_row}, step=0)
                last, t_end, t_prev = self._step(t_prev)
                if self.save_due:
                    self._save()
                    if self.stop.name:
                        break
        except WorkerLost:
            self.checkpoints.seal()
            self._save_lost()
            raise
        times = {
            "perf/first_eval_s": first_eval_s,
            "perf/loop_s": t_end - t_loop - first_eval_s,  # the first step to the last step's publish
            "perf/final_s": t_prev - t_end,  # the last step's wait for the final evaluation and weight offers
        }
        return self._finish(warm, last, times)

    def _finish(self, warm: dict[str, Any], last: dict[str, float], times: dict[str, float]) -> dict[str, Any]:
        """End the run (the last checkpoint sealed, restarts in, workers stopped, the ledger checked);
        its summary."""
        self.checkpoints.seal()
        self.supervisor.await_restarts()
        late = {k: v for k, v in values(self.supervisor.metrics()).items() if k.startswith("fault/") and v}
        if late:  # a restart that ended after the last step: a row of its own
            self.monitor.log(late, step=self.step)
        self.schedule.close()
        for w in self.workers:
            w.stop.remote()
        ledger = {
            **self.get(self.buffer.ledger.remote(), "buffer"),
            **self.get(self.trainer.rank0.ledger.remote(), "trainer"),
        }
        if ledger["trained_groups"] != ledger["unique_trained_groups"]:  # a fault's second copy got through
            raise RunError(
                f"the trainer trained {ledger['trained_groups']} groups but only "
                f"{ledger['unique_trained_groups']} distinct ones: a group was trained twice (see "
                f"fault/ in {self.cfg.run_dir / 'metrics.jsonl'}); please report it"
            )
        saved = self.checkpoints.saved
        return {
            **{f"{k}_before": v for k, v in self.before.items() if k.startswith("eval/")},
            **{k: v for k, v in last.items() if k.startswith("eval/")},
            "warm_start/eval/accuracy": warm.get("eval/accuracy", float("nan")),
            **{f"ledger/{k}": float(v) for k, v in ledger.items()},
            "ledger/sampled_prompts": float(self.sampler.next_group_id),
            **times,
            "fault/worker_restarts": float(sum(self.supervisor.restarts)),
            **({"stopped_at_step": self.step, "stopped_by": self.stop.name} if self.stop.name else {}),
            **({"resumable_checkpoint": str(saved)} if saved else {}),
            **self.checkpoints.times,  # a checkpoint at the last step
        }

    def _dispatch(self) -> None:
        while self.next_batch <= self.cfg.train.steps and may_dispatch(
            self.next_batch, self.step, self.version, self.published, self.cfg.algorithm.minibatches, self.bound.bound
        ):
            self.dispatch.batch(self.next_batch, self.published)
            self.next_batch += 1

    def _step(self, t_prev: float) -> tuple[dict[str, float], float, float]:
        """Train step `self.step` once its groups are in, publish, collect evaluations, log; the
        step's row, when its publish ended and when it ended."""
        cfg, step, steps = self.cfg, self.step, self.cfg.train.steps
        t0 = time.perf_counter()
        self.dispatch.wait(step, self.version, self.published)
        self.checkpoints.seal()  # the last checkpoint's trainer part was written meanwhile
        t1 = time.perf_counter()
        result: StepResult = self.get(self.trainer.call("step", batch_id=step), "trainer step")[0]
        self.schedule.write(json.dumps({"step": step, "version": self.version, "groups": result.groups}) + "\n")
        self.version, self.trained = result.version, step
        metrics = merge(
            [
                result.metrics,
                self.get(self.buffer.pop_counts.remote(), "buffer"),
                self.dispatch.metrics(),
                self.supervisor.metrics(),
            ]
        )
        metrics["async/staleness_bound"] = largest(float(self.bound.bound))  # what this step dispatched under
        metrics.update({k: largest(v) for k, v in self.checkpoints.take_times().items()})
        self.bound.update(values(metrics))
        t2 = time.perf_counter()
        evaluate = step == steps or bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
        # A signal arriving after this is taken at the next step.
        self.save_due = self.checkpoints.due(step, self.stop.name is not None)
        try:
            if step % cfg.weight_sync.every == 0 or evaluate or self.save_due:
                metrics.update(self.publishing.publish())
                if evaluate:
                    self.evals.request(self.published)
            t3 = time.perf_counter()
            *older, newest = self.evals.collect(wait=step == steps) or [{}]
            for m in older:  # ended together with a newer one: a row of its own, so no evaluation goes unlogged
                self.monitor.log(values(m), step=step)
            metrics.update(newest)
            metrics.update(self.offers.collect(cfg.ray.stall_timeout_s if step == steps else 0.0))
        except WorkerLost:  # the step is trained, and in the checkpoint written now: so is its row
            self.monitor.log({**values(metrics), "train/version": float(self.version)}, step=step)
            raise
        t4 = time.perf_counter()
        row = {**values(metrics), "train/version": float(self.version)}
        row.update(_perf(row, (t_prev, t0, t1, t2, t3, t4)))
        self.monitor.log(row, step=step)
        return row, t3, t4

    def _save(self) -> None:
        """Start checkpoint `self.step`: no group left in flight, evaluations in, the driver's and the
        buffer's state written; the trainer writes its part while the next batches generate."""
        t0 = time.perf_counter()
        self.dispatch.drain(self.published)
        for m in self.evals.collect(wait=True):
            self.monitor.log(values(m), step=self.step)
        self.checkpoints.begin(self.step, self._checkpoint_state(), t0)

    def _save_lost(self) -> None:
        """A worker was lost for good: a checkpoint of the last step trained, holding the groups still
        in flight (the dead worker's are not waited for), which the resumed run hands out again."""
        if self.trained == 0:
            return
        self.step = self.trained
        self.supervisor.settle()
        self.checkpoints.write_now(self.step, self._checkpoint_state(), len(self.dispatch.in_flight))

    def _checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the trainer's part: the driver's state and the buffer's."""
        return {**self.state(), "buffer": self.get(self.buffer.state.remote(), "buffer")}


def _perf(m: dict[str, float], times: tuple[float, ...]) -> dict[str, float]:
    """Wall-clock split of one driver step: waiting for the batch's rollout (what the trainer idles
    on), the train step, publishing, evaluation; step time is end to end since the last step.

    Rollout tokens/s is the fleet's: the tokens generated since the last step over the time during
    which at least one worker was generating (`perf/generate_time_s`, the union of the generate calls'
    intervals). A worker's calls add up, workers side by side count once; time with every worker idle
    (waiting for weights, held back by the staleness bound) is left out."""
    t_prev, t0, t1, t2, t3, t4 = times
    return {
        "perf/step_time_s": t4 - t_prev,
        "perf/rollout_wall_s": t1 - t0,
        "perf/train_wall_s": t2 - t1,
        "perf/sync_wall_s": t3 - t2,
        "perf/eval_wall_s": t4 - t3,
        "perf/rollout_tokens_per_s": m.get("perf/rollout_tokens", 0.0) / max(m.get("perf/generate_time_s", 0.0), 1e-9),
    }
