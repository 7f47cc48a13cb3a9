"""The TrajectoryBuffer: groups in, filtered and staleness-checked batches out.

`TrajectoryBuffer` is plain logic (tested without Ray) and becomes the buffer actor with
`ray.remote(TrajectoryBuffer)`. Nothing leaves silently: every dropped sample or group is counted
under a named metric.
"""

from __future__ import annotations

from collections import Counter, deque

from tidal.config import FilterConfig
from tidal.types import Group


def filter_group(group: Group, cfg: FilterConfig, counts: Counter[str]) -> Group | None:
    """Apply the sample filters, then the zero-variance group filter; None when the group is dropped.

    Sample filters leave groups of unequal size; advantages are then normalised per group.
    """
    samples = group.samples
    if cfg.drop_truncated:
        kept = [s for s in samples if s.finish_reason != "length"]
        counts["rollout/filtered_truncated_samples"] += len(samples) - len(kept)
        samples = kept
    if cfg.drop_failed_rewards:
        kept = [s for s in samples if not s.reward_errors]
        counts["rollout/filtered_failed_reward_samples"] += len(samples) - len(kept)
        samples = kept
    if not samples:
        counts["rollout/filtered_empty_groups"] += 1
        return None
    if cfg.zero_variance and len({s.reward for s in samples}) == 1:
        counts["rollout/filtered_zero_variance_groups"] += 1
        counts["rollout/filtered_zero_variance_samples"] += len(samples)
        return None
    return Group(group.group_id, samples)


class TrajectoryBuffer:
    """FIFO of filtered groups with a staleness bound.

    A group of version v is handed out only while the trainer's version is <= v + max_staleness;
    older groups are dropped and counted in `async/dropped_stale_groups` / `_samples`.
    """

    def __init__(self, cfg: FilterConfig, max_staleness: int) -> None:
        self.cfg = cfg
        self.max_staleness = max_staleness
        self.groups: deque[Group] = deque()
        self.counts: Counter[str] = Counter()

    def put(self, groups: list[Group]) -> int:
        """Filter and enqueue; returns the number of groups kept."""
        kept = [g for g in (filter_group(g, self.cfg, self.counts) for g in groups) if g is not None]
        self.counts["rollout/groups_generated"] += len(groups)
        self.counts["rollout/groups_kept"] += len(kept)
        self.groups.extend(kept)
        return len(kept)

    def get(self, max_groups: int, trainer_version: int) -> list[Group]:
        """Up to `max_groups` of the oldest groups still fresh enough for `trainer_version`."""
        out: list[Group] = []
        while self.groups and len(out) < max_groups:
            g = self.groups.popleft()
            if trainer_version > g.version + self.max_staleness:
                self.counts["async/dropped_stale_groups"] += 1
                self.counts["async/dropped_stale_samples"] += len(g.samples)
                continue
            out.append(g)
        return out

    def size(self) -> int:
        return len(self.groups)

    def pop_counts(self) -> dict[str, float]:
        """Counters since the last call (per-step metrics), plus the buffer fill."""
        out = {k: float(v) for k, v in self.counts.items()}
        self.counts.clear()
        out["async/buffer_groups"] = float(len(self.groups))
        return out
