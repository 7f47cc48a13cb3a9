"""The driver's checkpoints: when one is due, and writing it beside training.

A checkpoint step (`train.checkpoint_every`, or the step a SIGTERM / SIGINT arrives in) has the
driver let every group in flight land and collect the evaluations; then `begin` writes the
driver's and the buffer's state and asks the trainer to write DeepSpeed's checkpoint, while the
workers go on with the next batches, and `seal` commits it before the next train step
(`tidal.checkpoint`). A worker lost for good gets a checkpoint written at once (`write_now`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tidal import checkpoint
from tidal.config import RunConfig
from tidal.trainer.group import TrainerGroup

log = logging.getLogger(__name__)


class Checkpoints:
    """A run's checkpoints from the driver's side (see the module doc)."""

    def __init__(self, cfg: RunConfig, trainer: TrainerGroup, get: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.get = get
        self.saving: tuple[list[Any], Path, float] | None = None
        """A checkpoint whose trainer part is being written: the trainer's calls, its directory, its start."""
        self.saved: Path | None = None
        self.times: dict[str, float] = {}
        """The last checkpoint's timings, logged with the next step."""

    def due(self, step: int, stopping: bool) -> bool:
        every = self.cfg.train.checkpoint_every
        return stopping or bool(every and step % every == 0)

    def begin(self, step: int, state: dict[str, Any], t0: float) -> None:
        """Write checkpoint `step`'s driver and buffer `state` and start the trainer's part (sealed by
        `seal`); `t0`: when the driver began draining for it."""
        t1 = time.perf_counter()
        tmp = checkpoint.begin(self.cfg.run_dir, step)
        checkpoint.write_driver_state(tmp, state)
        self.saving = (self.trainer.call("save_state", str(tmp / checkpoint.TRAINER)), tmp, t0)
        # Draining, the workers finish the groups in flight; then none is dispatched until the state is written.
        self.times = {"perf/checkpoint_drain_s": t1 - t0, "perf/checkpoint_state_s": time.perf_counter() - t1}

    def seal(self) -> None:
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
        self.times.update(
            {"perf/checkpoint_trainer_s": trainer_s, "perf/checkpoint_wait_s": time.perf_counter() - t_wait}
        )

    def write_now(self, step: int, state: dict[str, Any], in_flight: int) -> None:
        """Checkpoint `step` written and sealed now (a worker was lost for good), with `in_flight`
        groups still to hand out again on resume."""
        tmp = checkpoint.begin(self.cfg.run_dir, step)
        checkpoint.write_driver_state(tmp, state)
        shards = self.get(self.trainer.call("save_state", str(tmp / checkpoint.TRAINER)), "checkpoint save")
        self.saved = checkpoint.commit(tmp, self.cfg.train.keep_checkpoints, shards)
        log.warning("checkpoint of step %d, with %d groups in flight, in %s", step, in_flight, self.saved)

    def take_times(self) -> dict[str, float]:
        """The last checkpoint's timings, once."""
        times, self.times = self.times, {}
        return times
