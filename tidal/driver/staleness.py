"""The staleness bound the driver dispatches rollout batches under: fixed, or adapted to how fast the
policy moves (`rollout.adaptive_staleness`, see `tidal.config.AdaptiveStaleness` for the evidence).

Why adapt it. An async run's damage from stale samples grows with the distance between the weights
that sampled them (mu) and the weights that train on them (pi_old), and M2PO's second moment
M2 = mean (log pi_old/mu)^2 measures that distance. On the quickstart M2 at staleness 4 is about 0.8
while the learning rate peaks (steps 10-50) and falls under 0.03 after step 100, and the accuracy
lost at staleness 4 is lost in that early phase. A fixed bound must choose between the early phase
(small bound, slow) and the late one (large bound, fast); this one follows the measured rate.

How. After every trained step the trainer reports `offpolicy/m2_per_version`, the M2 one version of
staleness costs (M2 over the batch's mean squared staleness). Its running estimate r (an exponential
moving average with weight `SMOOTHING` on the newest step, so that a noisy batch moves the bound by
at most one notch) gives the predicted M2 of a batch k versions stale as r k^2, and the bound becomes
the largest k in [min_staleness, max_staleness] with r k^2 <= m2_target. Until a stale token has been
measured the bound is min_staleness. A lowered bound stops the driver dispatching further ahead; the
batches already out keep the staleness they were dispatched under (they are within max_staleness,
which the buffer enforces), so a change takes effect within that many steps.
"""

from __future__ import annotations

import math

from tidal.config import AdaptiveStaleness

SMOOTHING = 0.5
"""Weight of the newest step's rate in the running estimate."""


class StalenessBound:
    """The bound in effect (`bound`), updated from each step's metrics by `update`."""

    def __init__(self, max_staleness: int, adaptive: AdaptiveStaleness | None) -> None:
        self.max_staleness = max_staleness
        self.adaptive = adaptive
        self.rate: float | None = None
        """Running estimate of M2 per squared version of staleness (None until measured)."""
        self.bound = max_staleness if adaptive is None else adaptive.min_staleness

    def update(self, metrics: dict[str, float]) -> None:
        """Take one step's `offpolicy/m2_per_version` (absent when no token was stale) into the estimate."""
        measured = metrics.get("offpolicy/m2_per_version")
        if self.adaptive is None or measured is None or not math.isfinite(measured):
            return
        self.rate = measured if self.rate is None else SMOOTHING * measured + (1 - SMOOTHING) * self.rate
        self.bound = bound_for(self.rate, self.adaptive.m2_target, self.adaptive.min_staleness, self.max_staleness)


def bound_for(rate: float, m2_target: float, low: int, high: int) -> int:
    """The largest k in [low, high] whose predicted second moment rate * k^2 is at most m2_target."""
    if rate <= 0.0:
        return high
    return max(low, min(high, math.floor(math.sqrt(m2_target / rate))))
