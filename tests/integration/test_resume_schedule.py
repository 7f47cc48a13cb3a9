"""A resume with more `train.steps` goes on along the lr schedule the run started with, and its first
log line says so: a real `tidal train` (Ray, DeepSpeed, the tiny MoE) in this process, a cosine run of
3 steps resumed from its step-2 checkpoint with train.steps=6."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from tidal.config import load_config
from tidal.stages.train import run_train

pytestmark = pytest.mark.integration

LR = 1e-3
CONFIG = {
    "name": "cosine",
    "model": {"preset": "tiny-qwen3-moe"},
    "data": {"source": {"ops": ["+"], "eval_size": 4}},
    "rollout": {"max_new_tokens": 4, "group_size": 4, "prompts_per_step": 4},
    "filter": {"zero_variance": False},
    # Over 3 optimizer steps the cosine goes 1, 0.75, 0.5 of the peak: the floor at the third.
    "trainer": {"lr": LR, "micro_batch_size": 16, "schedule": {"type": "cosine", "min_lr_ratio": 0.5}},
    "train": {"steps": 3, "eval_every": 0, "checkpoint_every": 2, "save_checkpoint": False},
    "eval": {"num_samples": 4, "max_new_tokens": 4},
    "monitor": {"wandb": "disabled"},
}


def lrs(run_dir: Path) -> dict[int, float]:
    """The lr each step trained with, by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}


@pytest.mark.slow  # per commit, tests/unit (test_checkpoint.py, test_trainer_schedule.py) check the decision, the lr
def test_a_resume_with_more_steps_keeps_the_lr_schedule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "runs")}))
    run_dir = tmp_path / "runs" / "cosine"
    run_train(load_config(path))
    first = lrs(run_dir)
    assert [first[s] for s in (1, 2, 3)] == pytest.approx([LR, 0.75 * LR, 0.5 * LR])

    with caplog.at_level(logging.INFO, logger="tidal.stages.train"):
        run_train(load_config(path, ["train.resume=true", "train.steps=6"]))
    resumed = lrs(run_dir)
    # From the step-2 checkpoint: step 3 as before (its lr was set before the save), then the floor.
    # Before the fix the schedule took the new length, 6 steps: step 4 trained at 0.67 x the peak, up
    # from 0.5 at step 3, and step 5 at 0.55.
    assert [resumed[s] for s in (1, 2, 3, 4, 5, 6)] == pytest.approx([first[1], first[2]] + [0.5 * LR] * 4)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming cosine"))
    assert line.startswith("resuming cosine from step 2 (") and line.endswith(
        "; train.steps is 6 now (6 optimizer steps), but the cosine lr schedule keeps the length it started with, "
        "3 optimizer steps, so the last 3 train at its floor, lr 0.0005 (trainer.schedule.min_lr_ratio=0.5); set "
        "trainer.schedule.total_steps to re-time it"
    )
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["schedule"]["total_steps"] == 3
