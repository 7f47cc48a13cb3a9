"""The terminal sink off a terminal: one plain line every `log_every` steps and at the last, no ANSI.
And the wandb mode a run asks for: online stays online whenever wandb itself finds a credential."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb
from rich.console import Console

from tidal.telemetry.monitor import ConsoleSink, wandb_mode

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
        "[step 0/20] eval_acc_before=0.1250",
        "[step 10/20] loss=1.5000",
        "[step 10/20] probe_acc=0.2500",
    ]


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A HOME with no wandb credential anywhere: no WANDB_API_KEY, an empty netrc path, no settings."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".config" / "wandb"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    wandb.teardown()  # wandb caches its settings and the session's credential per process
    yield tmp_path
    wandb.teardown()


def test_online_stays_online_for_a_user_logged_in_with_wandb_login(bare_home: Path) -> None:
    """`wandb login` writes the key to ~/.netrc, not to the environment."""
    (bare_home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a1" * 20 + "\n")
    assert wandb_mode("online") == "online"


def test_online_falls_back_to_offline_without_any_credential(bare_home: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tidal.telemetry.monitor"):
        assert wandb_mode("online") == "offline"
    assert len(caplog.records) == 1 and "offline" in caplog.records[0].getMessage()


def test_online_with_the_key_in_the_environment(bare_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "b2" * 20)
    assert wandb_mode("online") == "online"
    assert wandb_mode("offline") == "offline"
