import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep wandb quiet and local in every test.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Presets and SFT warm starts are cached by content (a directory's name hashes everything that built
# it), so every test shares one cache that outlives the run, apart from the user's own: a warm start is
# trained once per machine, not inside each test that needs it.
os.environ.setdefault("TIDAL_CACHE", str(Path.home() / ".cache" / "tidal-tests"))
# Every test's Ray cluster is local and its own. Ray caches the auth mode per process, so one test
# clusters with token auth and another without would fail to start each other's GCS; none uses it.
os.environ["RAY_AUTH_MODE"] = "disabled"


# ----------------------------------------------------------------------------------- one Ray runtime
# The process that holds the session's Ray runtime: it starts one and waits until its stdin closes
# (the session ended, or the pytest process died), then stops it.
_HOLDER = """
import logging, sys
import ray
ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="session", autouse=True)
def ray_runtime(request: pytest.FixtureRequest) -> Iterator[None]:
    """One Ray runtime for every run of the session: a run joins it as a job of its own through
    RAY_ADDRESS, as under `ray job submit` (`tidal.runtime.start_ray`), instead of starting and
    stopping a runtime of its own (about 4 s each). Its 8 logical CPUs fit any one run's actors while a
    finished run's are still going away. Started only when an integration test is selected."""
    if "RAY_ADDRESS" in os.environ or not any(i.get_closest_marker("integration") for i in request.session.items):
        yield
        return
    log = tempfile.NamedTemporaryFile(prefix="tidal-tests-ray-", suffix=".log", delete=False)  # noqa: SIM115
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
    )
    address = holder.stdout.readline().strip() if holder.stdout else ""
    if not address:
        holder.kill()
        raise RuntimeError(f"the tests' Ray runtime did not start; see {log.name}")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        del os.environ["RAY_ADDRESS"]
        if holder.stdin:
            holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
        log.close()


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def preset() -> Iterator[Path]:
    """The tiny Qwen3-MoE preset (seed 0), for a module that does not define its own. In-process
    rollout workers and trainer actors set torch to their one thread: the count is restored after."""
    import torch

    from tidal.model.loading import materialize_preset

    threads = torch.get_num_threads()
    yield materialize_preset("tiny-qwen3-moe", seed=0)
    torch.set_num_threads(threads)


def _example_run(tmp_path: Path, config: str, *overrides: str) -> tuple[list[dict], dict]:
    """`tidal train config` from the repository root, as the README says, into tmp_path/runs: the
    run's metric rows and summary (its exit status asserted 0)."""
    import json

    out = tmp_path / "runs"
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    cmd = [sys.executable, "-m", "tidal.cli", "train", config, f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [d for d in out.iterdir() if (d / "summary.json").is_file()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run / "summary.json").read_text())


@pytest.fixture
def example_run(tmp_path: Path):
    """`example_run(config, *overrides)`: `tidal train config` in a subprocess (see `_example_run`)."""
    return lambda config, *overrides: _example_run(tmp_path, config, *overrides)


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


# ---------------------------------------------------------------------------------------- budget
# `bash scripts/test.sh` runs the per-commit tiers with `--budget-s=900`: a run whose tests take longer
# fails, naming its slowest tests, so the suite cannot creep past what a commit can afford (the slow
# evidence runs live in the `--all` tier).
_started: list[float] = []
_durations: dict[str, float] = {}
_verdict: list[str] = []
_session: list[pytest.Session] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--budget-s",
        type=float,
        default=None,
        help="fail the run when its tests take longer than this many seconds (wall time)",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    _started.append(time.monotonic())
    _session.append(session)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def _over_budget(config: pytest.Config) -> str | None:
    budget = config.getoption("--budget-s")
    if budget is None or not _started:
        return None
    took = time.monotonic() - _started[0]
    if took <= budget:
        return None
    slowest = sorted(_durations.items(), key=lambda kv: -kv[1])[:10]
    named = "\n".join(f"  {s:7.1f} s  {test}" for test, s in slowest)
    return f"the tests took {took:.0f} s, over the budget of {budget:.0f} s; the slowest:\n{named}"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    over = _over_budget(session.config)
    if over:
        _verdict.append(over)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for over in _verdict:
        terminalreporter.section("test budget", sep="=", red=True, bold=True)
        terminalreporter.line(over)


# ------------------------------------------------------------------------------------- a clean exit
# This process connects to Ray and disconnects again once per in-process run (dozens per session).
# Ray's core worker does not survive that reliably at interpreter exit: once in five loaded runs of
# the suite, every test passed and the summary printed, then the process died of SIGSEGV in a native
# thread jumping into freed memory that a Ray GCS client string had taken over (the kernel log; Ray
# documents the cause, "not safe to use ray.shutdown() followed by creating new Ray sessions in the
# same process", ray-project/ray#31145). So a session that used Ray ends here, after pytest has
# written everything, with its own exit status, skipping the native teardown. `tidal train` connects
# once per process and exits normally (its exit status is asserted in tests/integration/test_train.py).


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if not _session or "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_session[0].exitstatus))
