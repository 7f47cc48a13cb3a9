"""TrajectoryBuffer logic: filters, staleness bound, counters — nothing leaves uncounted."""

from __future__ import annotations

import pytest

from tidal.config import FilterConfig
from tidal.rollout.buffer import TrajectoryBuffer
from tidal.stages.train import PromptSampler
from tidal.telemetry.metrics import values
from tidal.types import Group, Prompt, Sample

pytestmark = pytest.mark.unit


def sample(gid: int, reward: float, version: int = 0, finish: str = "stop", errors: list[str] | None = None) -> Sample:
    return Sample(
        group_id=gid,
        prompt_ids=[1, 2],
        response_ids=[3],
        loss_mask=[1],
        logp_mu=[-0.5],
        finish_reason=finish,
        version=version,
        versions=[version],
        reward=reward,  # type: ignore[arg-type]
        reward_errors=errors or [],
    )


def test_zero_variance_groups_are_dropped_and_counted() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=True), max_staleness=0)
    kept = buf.put(
        [
            Group(0, [sample(0, 1.0), sample(0, 0.0)]),
            Group(1, [sample(1, 1.0), sample(1, 1.0), sample(1, 1.0)]),
            Group(2, [sample(2, 0.0)]),
        ]
    )
    assert kept == 1
    assert [g.group_id for g in buf.take(0, trainer_version=0)] == [0]
    counts = values(buf.pop_counts())
    assert counts["rollout/filtered_zero_variance_groups"] == 2
    assert counts["rollout/filtered_zero_variance_samples"] == 4
    assert counts["rollout/groups_generated"] == 3 and counts["rollout/groups_kept"] == 1
    # Counters are per call.
    assert values(buf.pop_counts()) == {
        "async/buffer_groups": 0.0,
        "async/buffer_batches": 0.0,
        "async/in_flight_groups": 0.0,
    }


def test_zero_variance_filter_off_keeps_everything() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=0)
    assert buf.put([Group(1, [sample(1, 1.0), sample(1, 1.0)])]) == 1


def test_sample_filters_leave_unequal_groups() -> None:
    cfg = FilterConfig(zero_variance=True, drop_truncated=True, drop_failed_rewards=True)
    buf = TrajectoryBuffer(cfg, max_staleness=0)
    buf.put(
        [
            Group(0, [sample(0, 1.0), sample(0, 0.0, finish="length"), sample(0, 0.0), sample(0, 0.0, errors=["x"])]),
            Group(1, [sample(1, 0.0, finish="length")]),
        ]
    )
    (g,) = buf.take(0, 0)
    assert [s.reward for s in g.samples] == [1.0, 0.0]
    counts = values(buf.pop_counts())
    assert counts["rollout/filtered_truncated_samples"] == 2
    assert counts["rollout/filtered_failed_reward_samples"] == 1
    assert counts["rollout/filtered_empty_groups"] == 1


def test_staleness_bound_drops_and_counts() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=1)
    buf.put([Group(0, [sample(0, 1.0, version=3)]), Group(1, [sample(1, 1.0, version=5), sample(1, 0.0, version=5)])])
    # At trainer version 5, version 3 is 2 behind (> 1): dropped; version 5 is fresh.
    out = buf.take(0, trainer_version=5)
    assert [g.group_id for g in out] == [1]
    counts = values(buf.pop_counts())
    assert counts["async/dropped_stale_groups"] == 1 and counts["async/dropped_stale_samples"] == 1


def test_batches_are_taken_whole_and_only_once() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=0)
    # Two workers' shares of batch 1 arrive after one share of batch 2.
    buf.put([Group(4, [sample(4, 1.0)])], batch_id=2)
    buf.put([Group(0, [sample(0, 1.0)]), Group(1, [sample(1, 1.0)])], batch_id=1)
    buf.put([Group(2, [sample(2, 1.0)])], batch_id=1)
    assert buf.size() == 4 and values(buf.pop_counts())["async/buffer_batches"] == 2
    assert [g.group_id for g in buf.take(1, 0)] == [0, 1, 2]
    assert buf.take(1, 0) == []  # taken already: never handed out twice
    assert [g.group_id for g in buf.take(2, 0)] == [4]
    assert buf.size() == 0


def test_ledger_accounts_for_every_group() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=True), max_staleness=1)
    for b in (1, 2, 3, 4):
        buf.dispatched(b, 2 if b == 1 else 1)
    buf.put([Group(0, [sample(0, 1.0), sample(0, 0.0)]), Group(1, [sample(1, 1.0), sample(1, 1.0)])], batch_id=1)
    buf.put([Group(2, [sample(2, 1.0, version=0), sample(2, 0.0, version=0)])], batch_id=2)
    buf.put([Group(3, [sample(3, 1.0, version=2), sample(3, 0.0, version=2)])], batch_id=3)
    buf.take(1, trainer_version=0)
    buf.take(2, trainer_version=2)  # version 0 at trainer version 2: too stale
    values(buf.pop_counts())  # per-step counters are cleared; the ledger keeps run totals
    assert buf.ledger() == {
        "dispatched_groups": 5,
        "in_flight_groups": 1,
        "generated_groups": 4,
        "filtered_groups": 1,
        "dropped_stale_groups": 1,
        "taken_groups": 1,
        "held_groups": 1,
    }


def test_streaming_takes_the_oldest_ready_groups_whatever_their_batch() -> None:
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=1, per_step=2)
    buf.dispatched(1, 2)
    buf.dispatched(2, 2)
    buf.put([Group(3, [sample(3, 1.0, version=1)])], batch_id=2)  # batch 2's fast group
    assert not buf.ready(1, trainer_version=1)  # one ready group, and batch 1 still generating
    buf.put([Group(0, [sample(0, 1.0, version=0)])], batch_id=1)
    assert buf.ready(1, trainer_version=1)  # two ready: the step need not wait for group 1
    assert [g.group_id for g in buf.take(1, trainer_version=1)] == [0, 3]  # oldest batch first
    # Group 1 ends after its batch's step; step 2 trains it with the rest of batch 2 when in.
    buf.put([Group(1, [sample(1, 1.0, version=1)])], batch_id=1)
    assert not buf.ready(2, trainer_version=2)
    buf.put([Group(2, [sample(2, 1.0, version=0)])], batch_id=2)  # version 0 at trainer 2: too stale
    assert buf.ready(2, trainer_version=2)  # nothing of batches <= 2 still generating
    assert [g.group_id for g in buf.take(2, trainer_version=2)] == [1]
    assert buf.ledger()["dropped_stale_groups"] == 1 and buf.ledger()["held_groups"] == 0


def test_a_group_overtaken_until_too_stale_is_reported_for_replacement_before_the_step() -> None:
    """A slow worker's group of version 0 lands after fresher ones trained step 1: at step 2 (trainer
    version 2, bound 1) it can never train. The status the driver reads before the step counts it with
    the filtered groups of its batch, so that over-sampling replaces it and the step waits for the
    replacement instead of training short (a run's last step once trained 2 groups of 8 so)."""
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=1, per_step=2)
    buf.dispatched(1, 2)
    buf.put([Group(0, [sample(0, 1.0, version=0)]), Group(1, [sample(1, 1.0, version=0)])], batch_id=1)
    assert [g.group_id for g in buf.take(1, trainer_version=1)] == [0, 1]
    buf.dispatched(2, 2)
    buf.put([Group(3, [sample(3, 1.0, version=1)]), Group(2, [sample(2, 1.0, version=0)])], batch_id=2)
    # Nothing is generating, so the step could start: the dispatcher first replaces what the status
    # counts (Dispatcher._wait_on), after which the step waits for the replacement.
    replace = buf.wait_ready(2, trainer_version=2, timeout_s=0.0).filtered
    assert {b: n for b, n in replace.items() if n} == {2: 1}
    assert buf.ledger()["dropped_stale_groups"] == 1
    buf.dispatched(2, 1)  # the replacement, as the dispatcher sends it
    assert not buf.wait_ready(2, trainer_version=2, timeout_s=0.0).ready
    buf.put([Group(4, [sample(4, 1.0, version=2)])], batch_id=2)
    assert buf.wait_ready(2, trainer_version=2, timeout_s=0.0).ready
    assert [g.group_id for g in buf.take(2, trainer_version=2)] == [3, 4]
    ledger = buf.ledger()
    assert ledger["generated_groups"] == ledger["dropped_stale_groups"] + ledger["taken_groups"] == 5


def test_wait_ready_wakes_on_a_put_from_another_thread() -> None:
    import threading

    buf = TrajectoryBuffer(FilterConfig(zero_variance=True), max_staleness=0)
    buf.dispatched(1, 2)
    groups = [Group(0, [sample(0, 1.0), sample(0, 1.0)]), Group(1, [sample(1, 1.0), sample(1, 0.0)])]
    putter = threading.Timer(0.05, lambda: buf.put(groups, 1, worker=1))
    putter.start()
    status = buf.wait_ready(1, trainer_version=0, timeout_s=30.0)
    putter.join()
    assert status.ready and status.filtered == {1: 1} and status.generated == {1: 2}
    buf.dispatched(2, 1)
    assert not buf.wait_ready(2, 0, timeout_s=0.01).ready  # batch 2 not in: the wait times out


def test_prompt_sampler_covers_an_epoch_before_repeating() -> None:
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": f"{i}+0=", "answer": str(i)} for i in range(10)])
    s = PromptSampler({"": (ds, 1.0)}, seed=0)
    first = s.take(10)
    assert sorted(p.row["answer"] for p in first) == [str(i) for i in range(10)]
    assert [p.group_id for p in first] == list(range(10))
    assert [p.group_id for p in s.take(3)] == [10, 11, 12]


def test_prompt_sampler_mixes_envs_by_weight() -> None:
    from datasets import Dataset

    a = Dataset.from_list([{"prompt": f"a{i}", "answer": ""} for i in range(5)])
    b = Dataset.from_list([{"prompt": f"b{i}", "answer": ""} for i in range(7)])
    s = PromptSampler({"a": (a, 3.0), "b": (b, 1.0)}, seed=0)
    prompts = s.take(4000)
    share = sum(p.env == "a" for p in prompts) / len(prompts)
    assert 0.72 < share < 0.78  # 3 : 1, within sampling noise (std ~0.007)
    assert all(p.row["prompt"][0] == p.env for p in prompts)  # each row comes with its own env
    # Each env's rows come in full passes: the first 5 of env a are its 5 rows.
    firsts = [p.row["prompt"] for p in prompts if p.env == "a"][:5]
    assert sorted(firsts) == [f"a{i}" for i in range(5)]
    assert len({p.group_id for p in prompts}) == 4000


def test_work_queue_batches_streaming_groups_and_keeps_fixed_work_alone() -> None:
    from tidal.rollout.queue import EvalRequest, Work, WorkQueue

    q = WorkQueue()
    prompts = [Prompt(i, {}) for i in range(5)]
    q.put(Work(prompts[:3], batch_id=1, min_version=0))  # queued group by group
    q.put(Work(prompts[3:], batch_id=2, min_version=1, seed=7, fixed=True))
    q.put(Work(prompts[:1], batch_id=3, min_version=1))
    request = EvalRequest(prompts, min_version=1)
    q.put_first(request)
    assert q.take(max_groups=2) == [request]  # evaluations jump the queue
    first = q.take(max_groups=2)
    assert [w.prompts[0].group_id for w in first] == [0, 1] and all(not w.fixed for w in first)
    assert [w.prompts[0].group_id for w in q.take(max_groups=2)] == [2]  # not batched with fixed work
    (fixed,) = q.take(max_groups=2)
    assert fixed.fixed and fixed.seed == 7 and [p.group_id for p in fixed.prompts] == [3, 4]
    left = q.close()
    assert [w.batch_id for w in left] == [3] and q.take(max_groups=2) is None


def test_a_group_handed_out_twice_lands_once_whatever_the_order_of_its_copies() -> None:
    """A worker's engine crashes: its scoring thread puts group 2 after the driver last asked what
    landed (the driver still counts it in flight), and group 3 after the driver handed it out again.
    Each is trained once, and the buffer tells the driver which of the groups it is about to hand out
    again have landed already."""
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=2, per_step=4)
    buf.dispatched(1, 4)
    buf.put([Group(0, [sample(0, 1.0)]), Group(1, [sample(1, 1.0)])], batch_id=1, worker=0)
    assert buf.landed_among([0, 1, 2, 3]) == [0, 1]  # the driver asks once a step
    buf.put([Group(2, [sample(2, 1.0)])], batch_id=1, worker=1)  # the crashed worker's, after it asked
    landed = buf.landed_among([2, 3])  # the driver asks again before handing 2 and 3 out again
    buf.put([Group(2, [sample(2, 0.0)])], batch_id=1, worker=0)  # a copy of 2 handed out all the same
    buf.put([Group(3, [sample(3, 1.0)])], batch_id=1, worker=1)  # the crashed worker's late copy of 3
    buf.put([Group(3, [sample(3, 0.0)])], batch_id=1, worker=0)  # the copy handed out again
    taken = buf.take(1, trainer_version=0)
    assert [(g.group_id, g.samples[0].reward) for g in taken] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]
    assert values(buf.pop_counts())["fault/duplicate_groups"] == 2
    assert buf.ledger()["generated_groups"] == 4 and buf.ledger()["in_flight_groups"] == 0
    assert landed == [2]


def test_a_resumed_buffer_still_drops_a_second_copy() -> None:
    """A checkpoint written when a worker was lost may hold a group both landed and in flight (the
    driver hands it out again on resume): the landed ids travel with the buffer's state."""
    buf = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=2, per_step=2)
    buf.dispatched(1, 3)
    buf.put([Group(g, [sample(g, 1.0)]) for g in (0, 1, 5)], batch_id=1)
    assert (buf.landed.below, buf.landed.above) == (2, {5})  # the ids kept stay few over a run
    resumed = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=2, per_step=2)
    resumed.load_state(buf.state())
    assert resumed.landed_among([1, 2, 5, 6]) == [1, 5]
    assert resumed.put([Group(5, [sample(5, 0.0)]), Group(6, [sample(6, 0.0)])], batch_id=1) == 1
    assert [g.group_id for g in resumed.take(1, 0)] == [0, 1]
    assert [g.group_id for g in resumed.take(2, 0)] == [5, 6]
