import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep wandb quiet and local in every test; presets are cached per user as in normal use.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Every test's Ray cluster is local and its own. Ray caches the auth mode per process, so one test
# clusters with token auth and another without would fail to start each other's GCS; none uses it.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture
def repo() -> Path:
    return REPO


def _check_ledger(summary: dict, rows: list[dict], batches: int, per_batch: int) -> None:
    """A run's ledger balances: every prompt sampled was dispatched once (a batch's prompts plus one
    per filtered group replaced), then generated or still in flight at the end; every generated
    group filtered, dropped as too stale, trained, or still held; none trained twice."""
    s = {k.removeprefix("ledger/"): v for k, v in summary.items() if k.startswith("ledger/")}
    oversampled = sum(r.get("rollout/oversampled_groups", 0.0) for r in rows)
    assert s["dispatched_groups"] == s["sampled_prompts"] == batches * per_batch + oversampled, s
    assert s["generated_groups"] + s["in_flight_groups"] == s["dispatched_groups"], s
    fates = s["filtered_groups"] + s["dropped_stale_groups"] + s["taken_groups"] + s["held_groups"]
    assert fates == s["generated_groups"], s
    assert s["trained_groups"] == s["unique_trained_groups"] == s["taken_groups"], s


@pytest.fixture
def ledger_balances():
    """`ledger_balances(summary, metric rows, batches, prompts per batch)` asserts the run's ledger."""
    return _check_ledger


# ------------------------------------------------------------------------------------------ exit
# Once every test has run and pytest has printed its report, the process ends with pytest's own exit
# status without running the interpreter's finalization. With every test passing, CI on 2026-12-01
# still ended with a segmentation fault (exit 139) after pytest's summary line: a crash in
# third-party teardown at interpreter exit (Ray's, vLLM's in-process engine, torch's threads), which
# says nothing about the tests and turned a green run red. The test report is complete by then.
_exit_status: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    import sys

    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
