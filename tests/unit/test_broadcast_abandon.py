"""The broadcast transport's poll loop (`tidal.weight_sync.broadcast._broadcast`) against a stand-in
process group: abandoning the group ends a broadcast as `SyncAbandoned` whichever of the two the
loop sees first, the flag or the work the abort completed with an error."""

from __future__ import annotations

import threading

import pytest
import torch

from tidal.weight_sync.broadcast import SyncAbandoned, _broadcast

pytestmark = pytest.mark.unit


class AbortedWork:
    """A collective that a group abort completed with gloo's error."""

    def is_completed(self) -> bool:
        return True

    def wait(self) -> None:
        raise RuntimeError("Connection closed by peer")


class AbandonedWhileSending:
    """A group abandoned (its flag set, then aborted) while its broadcast is being posted."""

    def __init__(self, abandoned: threading.Event) -> None:
        self.abandoned = abandoned

    def broadcast(self, tensors: list[torch.Tensor], opts: object) -> AbortedWork:
        self.abandoned.set()
        return AbortedWork()


class Aborted:
    """A group whose broadcast failed without being abandoned (a member died mid-send)."""

    def broadcast(self, tensors: list[torch.Tensor], opts: object) -> AbortedWork:
        return AbortedWork()


def test_an_abort_that_completes_the_work_first_is_still_an_abandonment() -> None:
    abandoned = threading.Event()
    with pytest.raises(SyncAbandoned, match="v1 header abandoned, the group is being re-formed"):
        _broadcast(AbandonedWhileSending(abandoned), torch.ones(4), 120.0, "v1 header", abandoned)


def test_a_failed_broadcast_of_a_group_not_abandoned_says_so() -> None:
    with pytest.raises(RuntimeError, match="v1 header did not complete within timeout_s=120"):
        _broadcast(Aborted(), torch.ones(4), 120.0, "v1 header", threading.Event())
