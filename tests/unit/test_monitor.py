"""The terminal sink off a terminal: one plain line every `log_every` steps and at the last, no ANSI."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tidal.monitor import ConsoleSink

pytestmark = pytest.mark.unit


def test_plain_output_every_log_every_steps_without_ansi_codes() -> None:
    out = io.StringIO()
    sink = ConsoleSink(total_steps=25, log_every=10, console=Console(file=out, force_terminal=False, width=40))
    assert sink.live is None
    for step in range(1, 26):
        sink.log({"reward/mean": step / 100, "train/loss": 0.5, "eval/accuracy": 0.25 + step / 1000}, step=step)
    sink.close()
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[step 10/25", "[step 20/25", "[step 25/25"]
    assert lines[-1] == "[step 25/25] reward=0.2500  eval_acc=0.2750  loss=0.5000"  # one line, never wrapped at 40
    assert "\x1b" not in out.getvalue()
    assert sink.best_eval == pytest.approx(0.275)


def test_a_row_with_nothing_to_show_prints_no_empty_line() -> None:
    """`tidal sft` logs its probe's accuracy in a row of its own and the before-training scores at
    step 0: each gets its label, and a row of other metrics only prints nothing."""
    out = io.StringIO()
    sink = ConsoleSink(total_steps=20, log_every=10, console=Console(file=out, force_terminal=False, width=80))
    sink.log({"eval/accuracy_before": 0.125}, step=0)
    sink.log({"train/loss": 1.5}, step=10)
    sink.log({"eval/probe_accuracy": 0.25}, step=10)
    sink.log({"perf/something_else": 3.0}, step=20)
    sink.close()
    assert out.getvalue().splitlines() == [
        "[step 0/20] eval_acc_before=0.1250", "[step 10/20] loss=1.5000", "[step 10/20] probe_acc=0.2500",
    ]  # fmt: skip
