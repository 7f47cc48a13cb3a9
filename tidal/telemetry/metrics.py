"""Metrics that say how they merge: every value is produced with its reduction.

A rollout worker, a trainer rank or a micro-batch reports a `Stat` per key: a count is a `total`
(summed), a rate or an average a `mean` with its weight (the samples or tokens it averages over), an
extreme a `largest` or `smallest`, time spent busy a `busy` interval. Merging rows from several
workers, ranks or micro-batches then follows each value's own declaration (`merge`), never its name:
a mean of minima or an average of counts cannot happen by accident. Values may be floats or 0-dim
tensors (inside the trainer, until its ranks have reduced them).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Reduce = Literal["sum", "mean", "max", "min", "std", "union"]


@dataclass(frozen=True)
class Stat:
    """One metric value and how it merges with the same key from other workers, ranks or micro-batches."""

    value: Any
    """A float, or a 0-dim tensor before the trainer's ranks reduce it."""
    reduce: Reduce = "mean"
    weight: Any = 1.0
    """What a `mean` or `std` is over (samples, tokens); unused by the other reductions."""
    center: float = 0.0
    """The mean a `std` is taken around (to pool deviations of several rows exactly)."""
    spans: tuple[tuple[float, float], ...] = ()
    """The disjoint wall-clock intervals (start, end) a `union` covers; its value is their total length."""


Metrics = dict[str, Stat]


def mean(value: Any, weight: Any = 1.0) -> Stat:
    """An average over `weight` items (samples, tokens); merged as the weighted mean."""
    return Stat(value, "mean", weight)


def total(value: Any) -> Stat:
    """A count or an amount; merged as the sum."""
    return Stat(value, "sum")


def largest(value: Any) -> Stat:
    """A maximum; merged as the maximum."""
    return Stat(value, "max")


def smallest(value: Any) -> Stat:
    """A minimum; merged as the minimum."""
    return Stat(value, "min")


def spread(std: float, center: float, weight: float) -> Stat:
    """A population standard deviation of `weight` items around their mean `center`; merged as the
    pooled standard deviation of all the items."""
    return Stat(std, "std", weight, center)


def busy(start: float, seconds: float) -> Stat:
    """Wall time busy from `start` (a `time.time()`, comparable across processes) for `seconds`; merged
    as the length of the union of all the intervals: the time during which at least one was running."""
    return Stat(seconds, "union", spans=((start, start + seconds),))


def merge(rows: Iterable[Metrics]) -> Metrics:
    """One row of metrics from several, key by key by each value's declared reduction. A key missing
    from a row merges the rows that have it; a key declared with two reductions is an error."""
    by_key: dict[str, list[Stat]] = {}
    for row in rows:
        for k, s in row.items():
            by_key.setdefault(k, []).append(s)
    return {k: _merge_key(k, stats) for k, stats in by_key.items()}


def _merge_key(key: str, stats: list[Stat]) -> Stat:
    kinds = {s.reduce for s in stats}
    if len(kinds) > 1:
        raise ValueError(f"metric {key!r} is declared with several reductions: {sorted(kinds)}")
    kind = stats[0].reduce
    if kind == "sum":
        return total(sum(s.value for s in stats))
    if kind == "max":
        return largest(max(s.value for s in stats))
    if kind == "min":
        return smallest(min(s.value for s in stats))
    if kind == "union":
        return _union([span for s in stats for span in s.spans])
    weight = sum(s.weight for s in stats)
    if kind == "std":
        if float(weight) == 0:
            return spread(0.0, 0.0, 0.0)
        center = sum(s.center * s.weight for s in stats) / weight
        var = sum(s.weight * (s.value**2 + (s.center - center) ** 2) for s in stats) / weight
        return spread(float(var) ** 0.5, center, weight)
    if float(weight) == 0:  # nothing to average over: the plain mean keeps the value defined
        return mean(sum(s.value for s in stats) / len(stats), weight)
    return mean(sum(s.value * s.weight for s in stats) / weight, weight)


def _union(spans: list[tuple[float, float]]) -> Stat:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return Stat(sum(end - start for start, end in merged), "union", spans=tuple(merged))


def values(row: Metrics) -> dict[str, float]:
    """The plain numbers of a row, for the monitor."""
    return {k: float(s.value) for k, s in row.items()}


class PeakRSS:
    """How far a block of code raised this process's peak resident memory, in bytes:

        with PeakRSS() as peak:
            publish()
        peak.growth  # peak RSS during the block minus RSS at its start; None where unmeasurable

    Linux: on entry, memory the C allocator holds free goes back to the system (glibc's
    `malloc_trim`), else the block could reuse it unseen, and the kernel's high-water mark (VmHWM)
    is reset through /proc/self/clear_refs, so short peaks count that sampling would miss. Shared
    pages the process touches (a Ray object store mapping) count too."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.growth: int | None = None

    def __enter__(self) -> PeakRSS:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_kb("VmRSS") * 1024
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is not None:
            self.growth = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")
