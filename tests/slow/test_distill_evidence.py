"""On-policy distillation end to end, as a user runs it (issue 32's evidence, one seed): the
quickstart's RL trains a teacher, then the quickstart's SFT warm start is distilled from it with the
teacher's signal alone, through `tidal train`. bench/distill.py runs the full comparison (3 seeds,
1000 held-out problems, RL alone beside it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 100


def train(tmp_path: Path, *overrides: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tidal.cli", "train", "configs/quickstart.yaml", "monitor.wandb=disabled", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_distillation_learns_from_the_teacher_alone(tmp_path: Path) -> None:
    """The teacher is the quickstart's 300 GRPO steps (a run directory: its checkpoint/ is taken).
    The student, from the same SFT warm start, learns from the teacher's per-token signal alone
    (reward_coef 0) for 100 steps: the per-token reverse KL must fall and held-out accuracy rise by 10
    points. It does not reach the teacher's accuracy: bench/distill.py measured 71.1% after 300
    steps against the teacher's 76.1% and RL alone's 73.2% (3 seeds, 1,000 problems, 2026-12-07),
    short of the issue's goal of 2 points; beside the reward, 73.6%; see docs/results.md."""
    train(tmp_path, f"output_dir={tmp_path / 'teacher'}")
    train(
        tmp_path,
        f"output_dir={tmp_path}",
        "name=distill",
        f"train.steps={STEPS}",
        f"algorithm.distill.teacher={tmp_path / 'teacher' / 'quickstart'}",
        "algorithm.distill.reward_coef=0",
        "train.save_checkpoint=false",
    )
    summary = json.loads((tmp_path / "distill" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert len(kl) >= STEPS and all(r["distill/teacher_share"] == 1.0 for r in rows if "distill/teacher_share" in r)
    assert sum(kl[-10:]) / 10 < 0.7 * sum(kl[:10]) / 10, kl
    assert summary["eval/accuracy"] - summary["eval/accuracy_before"] >= 0.10, summary
