"""Stop and resume: a run killed with SIGKILL (the driver and every actor) at a random step and
resumed trains on exactly the groups the uninterrupted run does, into the same weights; SIGTERM
writes a checkpoint and exits 0; a resume that would change the run is refused with one line.

Real `tidal train` processes (Ray, DeepSpeed, the tiny MoE), killed for real.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tidal import checkpoint
from tidal.cli import main
from tidal.config import load_config
from tidal.model.loading import materialize_preset
from tidal.stages.train import run_train

pytestmark = pytest.mark.integration

TIDAL = [sys.executable, "-m", "tidal.cli"]
STEPS = 6
CONFIG = {
    "model": {"preset": "tiny-qwen3-moe"},
    "data": {"source": {"ops": ["+"], "eval_size": 8}},
    "rollout": {"max_new_tokens": 4, "group_size": 4, "prompts_per_step": 8, "num_workers": 2, "max_staleness": 1},
    "filter": {"zero_variance": False},
    "trainer": {"lr": 1e-3, "micro_batch_size": 32},
    "train": {"steps": STEPS, "eval_every": 3, "checkpoint_every": 2},
    "eval": {"num_samples": 8, "max_new_tokens": 4},
    "monitor": {"wandb": "offline"},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    materialize_preset("tiny-qwen3-moe", seed=0)
    path = tmp_path_factory.mktemp("resume") / "run.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(path.parent / "runs")}))
    return path


def tidal(*args: str, **kwargs: Any) -> subprocess.Popen:
    """`tidal ...` in a session of its own, so that killing the group kills the driver and every actor."""
    # Not this process's wandb service (a run in it started one): each run starts its own, as from a shell.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.Popen(
        [*TIDAL, *args],
        start_new_session=True,
        stdout=kwargs.pop("log"),
        stderr=subprocess.STDOUT,
        cwd=kwargs.pop("cwd"),
        env=env,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
        if any(json.loads(r)["step"] >= step and "train/version" in json.loads(r) for r in rows):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})")


def finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def outcome(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "rows": rows,
        "steps": [r for r in rows if "train/version" in r],
        "schedule": [json.loads(line) for line in (run_dir / "schedule.jsonl").read_text().splitlines()],
        "params": load_file(run_dir / "checkpoint" / "model.safetensors"),
    }


@pytest.mark.slow  # two runs and a resume; per commit, the SIGTERM test stops and resumes a run
def test_a_killed_run_resumes_into_the_uninterrupted_one(config: Path, ledger_balances) -> None:
    """Deterministic mode, ZeRO 0; the object-store transport, resumed with the disk transport (a
    transport may change on resume: each delivers the same bits)."""
    det = ["rollout.deterministic=true"]
    whole = load_config(config, [*det, "name=whole"])
    run_train(whole)
    killed = whole.run_dir.with_name("killed")
    log = config.parent / "killed.log"
    with log.open("w") as f:
        proc = tidal("train", str(config), *det, "name=killed", log=f, cwd=config.parent)
        wait_for_step(killed, random.choice([3, 5]), proc)  # between two checkpoints (every 2 steps)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "summary.json").exists()
    (step, _), *_ = reversed(checkpoint.complete_checkpoints(killed))
    # A save cut short by the kill would be left unfinished: resume must not take it.
    checkpoint.begin(killed, step + 1)
    with log.open("a") as f:
        resume = [*det, "name=killed", "train.resume=true", "weight_sync.transport.type=disk"]
        out = finish(tidal("train", str(config), *resume, log=f, cwd=config.parent), log)
    assert f"resuming killed from step {step}" in out
    a, b = outcome(whole.run_dir), outcome(killed)
    assert b["schedule"] == a["schedule"]  # the same groups, from the same workers and versions, at the same steps
    assert [r["step"] for r in b["steps"]] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["train/loss"] for r in b["steps"]] == [r["train/loss"] for r in a["steps"]]
    assert a["params"].keys() == b["params"].keys() and all(
        torch.equal(a["params"][k], b["params"][k]) for k in a["params"]
    )
    ledger_balances(b["summary"], b["rows"], STEPS, 8)
    assert b["summary"]["ledger/trained_groups"] == STEPS * 8
    assert b["summary"]["eval/accuracy_before"] == a["summary"]["eval/accuracy_before"]
    # The wandb run goes on as the same run.
    runs = sorted((killed / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def refused(config: Path, args: list[str]) -> str:
    """`tidal train` refusing before it starts anything: exit 2 and one line, returned."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train", str(config), *args]) == 2
    (line,) = err.getvalue().splitlines()
    return line


def test_sigterm_checkpoints_exits_zero_and_resume_finishes(config: Path, ledger_balances) -> None:
    """Streaming, ZeRO 3, the broadcast transport; the signal only to the driver, as a scheduler sends it."""
    args = ["name=term", "trainer.zero_stage=3", "weight_sync.transport.type=broadcast", "train.checkpoint_every=0"]
    run_dir = config.parent / "runs" / "term"
    log = config.parent / "term.log"
    with log.open("w") as f:
        proc = tidal("train", str(config), *args, log=f, cwd=config.parent)
        wait_for_step(run_dir, 2, proc)
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, log)
    (stopped,) = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step")]
    step = json.loads((run_dir / "summary.json").read_text())["stopped_at_step"]
    assert f"at step {step} of {STEPS}: checkpoint in {run_dir}/checkpoints/step_" in stopped
    assert stopped.endswith("to continue, run the same command with train.resume=true")
    assert [s for s, _ in checkpoint.complete_checkpoints(run_dir)] == [step]
    with log.open("a") as f:
        finish(tidal("train", str(config), *args, "train.resume=true", log=f, cwd=config.parent), log)
    b = outcome(run_dir)
    ledger_balances(b["summary"], b["rows"], STEPS, 8)
    trained = [g["id"] for row in b["schedule"] for g in row["groups"]]
    # None trained twice, and none lost: every prompt trained, or (streaming, when a worker falls
    # behind) dropped as too stale and counted.
    stale = b["summary"]["ledger/dropped_stale_groups"]
    assert len(set(trained)) == len(trained) and set(trained) <= set(range(STEPS * 8))
    assert len(trained) + stale == STEPS * 8, (sorted(trained), stale)
    assert [row["step"] for row in b["schedule"]] == list(range(1, STEPS + 1))
    # The wandb run goes on as the same run.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs
    # ...and a resume that would change the run, or a new run over it, is refused with one line.
    for more, message in [
        (
            ["train.resume=true", "rollout.group_size=2", "model.preset=tiny-glm5-moe"],
            "with a config that changes model.preset, rollout.group_size;",
        ),
        ([], "already holds checkpoints: resume it with train.resume=true"),
        (["name=never-ran", "train.resume=true"], "holds no complete checkpoint"),
    ]:
        assert message in refused(config, [*args, *more])
