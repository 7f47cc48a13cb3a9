"""The driver's dispatch rule as a pure function: rollout batches go out as far ahead of the trainer
as the staleness bound allows, and never further."""

from __future__ import annotations

import random

import pytest

from tidal.driver.dispatch import may_dispatch

pytestmark = pytest.mark.unit


def simulate(
    steps: int, bound: int, minibatches: int, every: int, skip: float, seed: int
) -> list[tuple[int, int, int]]:
    """The driver loop's bookkeeping alone: (batch, step it was dispatched before, staleness it was
    trained at) per batch, with random skipped steps (every group filtered)."""
    rng = random.Random(seed)
    version = published = 0
    next_batch = 1
    dispatched: dict[int, tuple[int, int]] = {}  # batch -> (step, weights >= this generated it)
    out = []
    for step in range(1, steps + 1):
        while next_batch <= steps and may_dispatch(next_batch, step, version, published, minibatches, bound):
            dispatched[next_batch] = (step, published)
            next_batch += 1
        # Maximal: the next batch would not fit (or there is none).
        if next_batch <= steps:
            assert version + (next_batch - step) * minibatches > published + bound
        at_step, generated_from = dispatched[step]
        out.append((step, at_step, version - generated_from))  # staleness when batch `step` trains
        if rng.random() >= skip:
            version += minibatches
        if step % every == 0 or step == steps:
            published = version
    return out


@pytest.mark.parametrize(
    "bound, minibatches, every",
    [(0, 1, 1), (1, 1, 1), (2, 1, 1), (4, 1, 1), (2, 2, 1), (3, 1, 2), (4, 2, 2), (1, 1, 2)],
)
def test_no_batch_is_trained_past_the_bound(bound: int, minibatches: int, every: int) -> None:
    if (every - 1) * minibatches > bound:
        pytest.skip("the config refuses publishes too rare for the bound")
    for seed in range(5):
        for _, _, staleness in simulate(40, bound, minibatches, every, skip=0.2, seed=seed):
            assert staleness <= bound


def test_how_far_ahead_batches_go() -> None:
    # On-policy: each batch goes out at its own step, rollout and training take turns.
    assert [at for _, at, _ in simulate(6, bound=0, minibatches=1, every=1, skip=0.0, seed=0)] == [1, 2, 3, 4, 5, 6]
    # Staleness 1: batch b + 1 is generated while batch b trains; staleness 2: two ahead at the start.
    assert [at for _, at, _ in simulate(6, bound=1, minibatches=1, every=1, skip=0.0, seed=0)] == [1, 1, 2, 3, 4, 5]
    assert [at for _, at, _ in simulate(6, bound=2, minibatches=1, every=1, skip=0.0, seed=0)] == [1, 1, 1, 2, 3, 4]
    # Two optimizer steps per batch use up the bound twice as fast.
    assert [at for _, at, _ in simulate(6, bound=2, minibatches=2, every=1, skip=0.0, seed=0)] == [1, 1, 2, 3, 4, 5]
    # Without skips every batch is trained exactly as stale as allowed.
    assert {s for _, _, s in simulate(8, bound=2, minibatches=1, every=1, skip=0.0, seed=0)[2:]} == {2}


def test_the_batch_about_to_train_always_goes_out() -> None:
    assert may_dispatch(5, 5, version=9, published=0, minibatches=1, bound=0)
    assert not may_dispatch(6, 5, version=4, published=4, minibatches=1, bound=0)
    assert may_dispatch(6, 5, version=4, published=4, minibatches=1, bound=1)


# A wait its caller bounds: the snapshot's buckets are in the object store already, and a receive
# that hung would hold the worker's weights, whose wait (`WeightStage.wait_for`) ends at
# ray.stall_timeout_s and fails the worker's serving loop.
UNBOUNDED_BY_DESIGN = {("tidal/weight_sync/object_store.py", "receive_buckets")}


def test_every_ray_get_in_tidal_is_bounded(repo) -> None:
    """A `ray.get` without a timeout waits forever on a hung actor, out of the stall watchdog's
    reach (`tidal.runtime.wait_for`): each one passes `timeout=` (0 for a ref known to be done)."""
    import ast

    unbounded = []
    for path in sorted((repo / "tidal").rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or (rel, fn.name) in UNBOUNDED_BY_DESIGN:
                continue
            for call in ast.walk(fn):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "get"
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "ray"
                    and not any(k.arg == "timeout" for k in call.keywords)
                ):
                    unbounded.append(f"{rel}:{call.lineno} in {fn.name}")
    assert not unbounded, unbounded
