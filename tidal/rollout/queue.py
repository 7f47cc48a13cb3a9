"""A rollout worker's queue of work: streaming groups, fixed shares of a batch, evaluation requests.

The driver's `submit` calls put work in on the worker's queue thread; the serving loop takes it out
on the generation thread (`take` blocks, `take_now` does not: continuous batching asks it for more
groups at a chunk boundary).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from tidal.telemetry.metrics import Metrics
from tidal.types import Prompt


@dataclass(frozen=True)
class Work:
    """Prompts handed to a worker for rollout batch `batch_id`, to generate with weights >= `min_version`.
    Streaming work (`fixed=False`) is queued group by group and batched with whatever else is queued;
    fixed work is generated as one call seeded with `seed` (`rollout.deterministic`)."""

    prompts: list[Prompt]
    batch_id: int
    min_version: int
    seed: int = 0
    fixed: bool = False


@dataclass
class EvalRequest:
    """A held-out evaluation waiting in a worker's queue; `done` is set when `result` (or `error`) is in."""

    prompts: list[Prompt]
    min_version: int
    done: threading.Event = field(default_factory=threading.Event)
    result: Metrics | None = None
    error: BaseException | None = None


class WorkQueue:
    """A worker's queue: streaming groups, fixed work, evaluation requests (which go first).

    `take` hands out one fixed work or evaluation alone, or up to `max_groups` streaming groups
    together; None once closed."""

    def __init__(self) -> None:
        self.items: deque[Work | EvalRequest] = deque()
        self.closed = False
        self._cv = threading.Condition()

    def put(self, work: Work | EvalRequest) -> None:
        with self._cv:
            if isinstance(work, EvalRequest) or work.fixed:
                self.items.append(work)
            else:
                self.items.extend(Work([p], work.batch_id, work.min_version) for p in work.prompts)
            self._cv.notify_all()

    def put_first(self, request: EvalRequest) -> None:
        with self._cv:
            self.items.appendleft(request)
            self._cv.notify_all()

    def close(self) -> list[Work | EvalRequest]:
        """Stop handing out work; returns what was still queued."""
        with self._cv:
            self.closed = True
            left, self.items = list(self.items), deque()
            self._cv.notify_all()
            return left

    def take_now(self, max_groups: int, env: str, max_version: int) -> list[Work]:
        """Without waiting: up to `max_groups` streaming groups from the front of the queue that are
        of `env` and may be generated with weights of `max_version` (none past an evaluation,
        fixed work, or a group that needs newer weights)."""
        out: list[Work] = []
        with self._cv:
            while self.items and len(out) < max_groups and not self.closed:
                head = self.items[0]
                if not _streams(head) or head.prompts[0].env != env or head.min_version > max_version:
                    break
                out.append(self.items.popleft())
        return out

    def take(self, max_groups: int) -> list[Work | EvalRequest] | None:
        with self._cv:
            self._cv.wait_for(lambda: self.items or self.closed)
            if self.closed:
                return None
            head = self.items[0]
            if isinstance(head, EvalRequest) or head.fixed:
                return [self.items.popleft()]
            out: list[Work | EvalRequest] = []
            while self.items and len(out) < max_groups and _streams(self.items[0]):
                out.append(self.items.popleft())
            return out


def _streams(item: Work | EvalRequest) -> bool:
    return isinstance(item, Work) and not item.fixed
