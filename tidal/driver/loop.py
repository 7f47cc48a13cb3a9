"""The RL driver's loop: dispatch, train, publish, evaluate, log, and checkpoint, step by step.

Workers generate rollout batches ahead of the trainer as far as the staleness bound allows
(`may_dispatch`); step s trains the oldest ready groups (batch s in deterministic mode). With
max_staleness 0 rollout and training take turns (on-policy). Held-out evaluations run on worker 0
between its generate calls, without stalling the loop.

A checkpoint step (`train.checkpoint_every`, or the step a SIGTERM / SIGINT arrives in) publishes
the trainer's weights, lets every group in flight land in the buffer, writes the driver's and the
buffer's state, and has the trainer write DeepSpeed's checkpoint while the workers go on with the
next batches; the checkpoint is sealed before the next train step (`tidal.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from tidal import checkpoint
from tidal.config import RunConfig
from tidal.driver.dispatch import Dispatcher, may_dispatch
from tidal.driver.staleness import StalenessBound
from tidal.driver.supervisor import Supervisor, WorkerLost, join_weight_sync
from tidal.driver.trackers import EvalTracker, SyncTracker
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
        self.supervisor = Supervisor(cfg, self.dispatch, [w.serve.remote() for w in workers], self._reform_weight_sync)
        self.evals = EvalTracker(self.supervisor, eval_rows, cfg.ray.stall_timeout_s)
        self.offers = SyncTracker(self.supervisor, broadcast=cfg.weight_sync.transport.type == "broadcast")
        self.step = 0  # the last step done
        self.trained = 0  # the last step the trainer took (a step fails after that, in its publish)
        self.version = self.published = 0  # the trainer's version; the newest version offered to the workers
        self.next_batch = 1
        self.before: dict[str, float] = {}  # held-out metrics before training
        self.saving: tuple[list[Any], Path, float] | None = None  # a checkpoint whose trainer part is being written
        self.saved: Path | None = None
        self.save_times: dict[str, float] = {}  # the last checkpoint's, logged with the next step
        self.save_due = False  # decided once per step, before its publish: the checkpoint needs that publish
        if resumed is not None:
            self._restore(resumed)
        # each step's groups as trained: group, batch, worker, generating versions
        self.schedule = (cfg.run_dir / "schedule.jsonl").open("a" if resumed else "w", buffering=1)

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
        self.step, self.version, self.published = state["step"], state["version"], state["published"]
        self.trained = self.step
        self.next_batch, self.before = state["next_batch"], state["before"]
        self.sampler.load_state(state["sampler"])
        self.dispatch.load_state(state["dispatch"])
        self.supervisor.restarts = state["dispatch"].get("restarts", self.supervisor.restarts)
        self.bound.rate, self.bound.bound = state["bound"]

    def run(self, warm: dict[str, Any]) -> dict[str, Any]:
        """Steps from the one after `self.step` to `train.steps` (or a stop signal); the summary."""
        steps = self.cfg.train.steps
        t_loop = t_prev = t_end = time.perf_counter()
        first_eval_s = 0.0
        if self.step == 0:
            self.evals.request(0)  # first in worker 0's queue: the weights it starts with
        else:  # resumed: the workers start from the initial policy
            self._publish()
            self.dispatch.resubmit(self.published)
        start = self.step + 1
        last: dict[str, float] = {}
        try:
            for step in range(start, steps + 1):
                self.step = step
                self._dispatch()
                if step == 1:
                    self.before = values((self.evals.collect(wait=True) or [{}])[-1])
                    first_eval_s = time.perf_counter() - t_loop
                    self.monitor.log(
                        {**self.before, **{f"warm_start/{k}": v for k, v in warm.items() if isinstance(v, float)}},
                        step=0,
                    )
                last, t_end, t_prev = self._step(t_prev)
                if self.save_due:
                    self._save()
                    if self.stop.name:
                        break
        except WorkerLost:
            self._seal()
            self._save_lost()
            raise
        self._seal()
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
        return {
            **{f"{k}_before": v for k, v in self.before.items() if k.startswith("eval/")},
            **{k: v for k, v in last.items() if k.startswith("eval/")},
            "warm_start/eval/accuracy": warm.get("eval/accuracy", float("nan")),
            **{f"ledger/{k}": float(v) for k, v in ledger.items()},
            "ledger/sampled_prompts": float(self.sampler.next_group_id),
            "perf/first_eval_s": first_eval_s,
            "perf/loop_s": t_end - t_loop - first_eval_s,  # the first step to the last step's publish
            "perf/final_s": t_prev - t_end,  # the last step's wait for the final evaluation and weight offers
            "fault/worker_restarts": float(sum(self.supervisor.restarts)),
            **({"stopped_at_step": self.step, "stopped_by": self.stop.name} if self.stop.name else {}),
            **({"resumable_checkpoint": str(self.saved)} if self.saved else {}),
            **self.save_times,  # a checkpoint at the last step
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
        self._seal()  # the last checkpoint's trainer part was written meanwhile
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
        metrics.update({k: largest(v) for k, v in self.save_times.items()})
        self.save_times = {}
        self.bound.update(values(metrics))
        t2 = time.perf_counter()
        evaluate = step == steps or bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
        self.save_due = self._checkpoint_due()  # a signal arriving after this is taken at the next step
        try:
            if step % cfg.weight_sync.every == 0 or evaluate or self.save_due:
                metrics.update(self._publish())
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

    def _publish(self) -> dict[str, Any]:
        import ray

        restarts = sum(self.supervisor.restarts)
        try:
            handle, metrics = self.get(self.trainer.call("publish"), "weight publish")[0]
        except ray.exceptions.RayTaskError:
            # A dead worker fails a broadcast: then it is the cause to name, and its restart re-formed
            # the group and sent these weights.
            if self.supervisor.restarted_since(restarts) and self.cfg.weight_sync.transport.type == "broadcast":
                return {}
            raise
        self.offers.add([w.offer_weights.remote(handle) for w in self.workers])
        self.supervisor.published(handle)
        self.published = handle.version
        return metrics

    def _reform_weight_sync(self) -> None:
        """A worker was restarted under the broadcast transport: every member leaves the old group (a
        receive waiting for the dead member ends), all join a new one, and the current weights go to
        every worker again (the new process has none; the others may have missed the last send)."""
        self.get([w.leave_weight_sync.remote() for w in self.workers], "leaving the weight-sync group")
        group = self.get(self.trainer.rank0.reform_weight_sync.remote(len(self.workers)), "weight-sync group")
        join_weight_sync(self.trainer.rank0, self.workers, group, self.cfg.ray.stall_timeout_s)
        handle, _ = self.get(self.trainer.call("publish"), "weight publish")[0]
        self.get([w.offer_weights.remote(handle) for w in self.workers], "weights over the re-formed group")
        self.supervisor.published(handle)
        self.published = handle.version

    def _checkpoint_due(self) -> bool:
        every = self.cfg.train.checkpoint_every
        return self.stop.name is not None or bool(every and self.step % every == 0)

    def _save(self) -> None:
        """Start checkpoint `self.step`: no group left in flight, evaluations in, the driver's and the
        buffer's state written; the trainer writes its part while the next batches generate."""
        t0 = time.perf_counter()
        self.dispatch.drain(self.published)
        for m in self.evals.collect(wait=True):
            self.monitor.log(values(m), step=self.step)
        t1 = time.perf_counter()
        tmp = checkpoint.begin(self.cfg.run_dir, self.step)
        buffer_state = self.get(self.buffer.state.remote(), "buffer")
        checkpoint.write_driver_state(tmp, {**self.state(), "buffer": buffer_state})
        self.saving = (self.trainer.call("save_state", str(tmp / checkpoint.TRAINER)), tmp, t0)
        # Draining, the workers finish the groups in flight; then none is dispatched until the state is written.
        self.save_times = {"perf/checkpoint_drain_s": t1 - t0, "perf/checkpoint_state_s": time.perf_counter() - t1}

    def _save_lost(self) -> None:
        """A worker was lost for good: a checkpoint of the last step trained, holding the groups still
        in flight (the dead worker's are not waited for), which the resumed run hands out again."""
        if self.trained == 0:
            return
        self.step = self.trained
        self.supervisor.settle()
        tmp = checkpoint.begin(self.cfg.run_dir, self.step)
        checkpoint.write_driver_state(tmp, {**self.state(), "buffer": self.get(self.buffer.state.remote(), "buffer")})
        shards = self.get(self.trainer.call("save_state", str(tmp / checkpoint.TRAINER)), "checkpoint save")
        self.saved = checkpoint.commit(tmp, self.cfg.train.keep_checkpoints, shards)
        log.warning(
            "checkpoint of step %d, with %d groups in flight, in %s",
            self.step,
            len(self.dispatch.in_flight),
            self.saved,
        )

    def _seal(self) -> None:
        """Wait for the trainer's part of the checkpoint being written and seal it."""
        if self.saving is None:
            return
        refs, tmp, t0 = self.saving
        t_wait = time.perf_counter()
        shards = self.get(refs, "checkpoint save")  # each rank's files, which the commit checks it sees
        trainer_s = max(shard.seconds for shard in shards)
        self.saving = None
        self.saved = checkpoint.commit(tmp, self.cfg.train.keep_checkpoints, shards)
        log.info(
            "checkpoint of step %s in %s (%.1fs)",
            self.saved.name.removeprefix("step_").lstrip("0"),
            self.saved,
            time.perf_counter() - t0,
        )
        # The trainer's write (it trains nothing meanwhile), and what of it the driver waited for.
        self.save_times.update(
            {"perf/checkpoint_trainer_s": trainer_s, "perf/checkpoint_wait_s": time.perf_counter() - t_wait}
        )


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
