"""The README's quickstart recipe end to end, as a user runs it: held-out accuracy must rise."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_raises_held_out_accuracy_by_ten_points(train_run) -> None:
    """`tidal train configs/quickstart.yaml`: the SFT warm start (trained on first use, or reused
    from the user's cache) to 300 steps of asynchronous GRPO. The README reports 36.5% -> 74.5%; ten
    points is far outside the noise of a 200-problem eval (about 3.5 points)."""
    run = train_run("configs/quickstart.yaml", "quickstart", 1800)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/num_samples"] == 200
    gain = summary["eval/accuracy"] - summary["eval/accuracy_before"]
    assert gain >= 0.10, summary
