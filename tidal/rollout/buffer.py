"""The TrajectoryBuffer: scored groups in, filtered and staleness-checked rollout batches out.

`TrajectoryBuffer` is plain logic (tested without Ray) and becomes the buffer actor with
`ray.remote(TrajectoryBuffer)`. Groups arrive tagged with the rollout batch they belong to (a batch
is one trainer step's prompts, split among the workers); the trainer takes a whole batch. Nothing
leaves silently: every dropped sample or group is counted under a named metric, and the running
totals (`ledger()`) account for every group ever put.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from tidal.config import FilterConfig
from tidal.metrics import Metrics, total
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
        kept = [s for s in samples if not s.failed]
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
    """Filtered groups by rollout batch, with the staleness bound applied when a batch is taken.

    A group of version v is handed out only while the trainer's version is <= v + max_staleness;
    older groups are dropped and counted in `async/dropped_stale_groups` / `_samples`. The driver
    dispatches prompts only as far ahead as the bound allows, so such drops are the exception.
    """

    def __init__(self, cfg: FilterConfig, max_staleness: int) -> None:
        self.cfg = cfg
        self.max_staleness = max_staleness
        self.batches: defaultdict[int, list[Group]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        """Per-step counters, cleared by `pop_counts`."""
        self.totals: Counter[str] = Counter()
        """Run totals of groups by fate: generated = filtered + dropped_stale + taken + still held."""

    def put(self, groups: list[Group], batch_id: int = 0) -> int:
        """Filter and hold `groups` under `batch_id`; returns the number of groups kept."""
        kept = [g for g in (filter_group(g, self.cfg, self.counts) for g in groups) if g is not None]
        self._count("rollout/groups_generated", len(groups))
        self._count("rollout/groups_kept", len(kept))
        self.totals["filtered_groups"] += len(groups) - len(kept)
        self.batches[batch_id].extend(kept)
        return len(kept)

    def take(self, batch_id: int, trainer_version: int) -> list[Group]:
        """The kept groups of `batch_id` still fresh enough for `trainer_version` (the batch is removed)."""
        out: list[Group] = []
        for g in self.batches.pop(batch_id, []):
            if trainer_version > g.version + self.max_staleness:
                self._count("async/dropped_stale_groups", 1)
                self.counts["async/dropped_stale_samples"] += len(g.samples)
                continue
            out.append(g)
        self.totals["taken_groups"] += len(out)
        return out

    def size(self) -> int:
        """Groups held."""
        return sum(len(b) for b in self.batches.values())

    def pop_counts(self) -> Metrics:
        """Counters since the last call (per-step metrics), plus the buffer fill."""
        out = {k: total(float(v)) for k, v in self.counts.items()}
        self.counts.clear()
        out["async/buffer_groups"] = total(float(self.size()))
        out["async/buffer_batches"] = total(float(sum(1 for b in self.batches.values() if b)))
        return out

    def ledger(self) -> dict[str, int]:
        """Run totals: `generated_groups` = `filtered_groups` + `dropped_stale_groups` +
        `taken_groups` + `held_groups`, so no group is lost without a count."""
        return {
            "generated_groups": self.totals["rollout/groups_generated"],
            "filtered_groups": self.totals["filtered_groups"],
            "dropped_stale_groups": self.totals["async/dropped_stale_groups"],
            "taken_groups": self.totals["taken_groups"],
            "held_groups": self.size(),
        }

    def _count(self, key: str, n: int) -> None:
        self.counts[key] += n
        self.totals[key] += n
