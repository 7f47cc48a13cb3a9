import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tidal.models import load_model, materialize_preset

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_tidal_sft_trains_evaluates_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """`tidal sft` end to end as a user runs it: the loss falls, eval runs, the checkpoint loads."""
    args = [
        "configs/sft_arithmetic.yaml", "name=t", f"output_dir={tmp_path}", "sft.steps=30", "sft.log_every=5",
        "data.source.train_size=500", "data.source.eval_size=16", "trainer.micro_batch_size=16",
        "trainer.grad_accum=2", "trainer.zero_stage=2", "trainer.schedule.warmup_steps=2",
    ]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "tidal.cli", "sft", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
    assert [row["step"] for row in rows if "train/loss" in row] == [5, 10, 15, 20, 25, 30]
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["eval/accuracy_before"] <= 1.0 and 0.0 <= summary["eval/accuracy"] <= 1.0
    assert summary["eval/num_samples"] == 16
    # Behavior log-probs of the engine and a teacher-forced forward of the same weights agree.
    assert summary["rollout/logp_mismatch_mean"] < 1e-5
    assert "held-out accuracy" in r.stdout

    trained = load_model(run / "checkpoint")
    initial = load_model(materialize_preset("tiny-qwen3-moe", 0))
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters(), strict=True)]
    assert all(moved)
    assert (run / "checkpoint" / "tokenizer.json").is_file()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
