"""The long task end to end, as a user runs it: answers of a few to over a thousand tokens, and RL
must raise held-out accuracy from the task's own SFT warm start."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_long_task_raises_held_out_accuracy_by_ten_points(train_run) -> None:
    """`tidal train configs/long.yaml`: the counting task's SFT warm start (trained on first use, or
    reused from the user's cache) to 100 steps of streaming, asynchronous GRPO under a token budget.
    Ten points is far outside the noise of a 200-problem eval (about 3.5 points). The steps must have
    trained long, uneven answers: rows past 300 tokens beside rows of a few."""
    run = train_run("configs/long.yaml", "long", 3600)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/num_samples"] == 200
    gain = summary["eval/accuracy"] - summary["eval/accuracy_before"]
    assert gain >= 0.10, summary
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    longest = max(s.get("rollout/response_length_max", 0) for s in steps)
    shortest = min(s["rollout/response_length_min"] for s in steps if "rollout/response_length_min" in s)
    assert longest > 300 and shortest < 10, (longest, shortest)
