"""`tidal sft` end to end as a user runs it, and held-out evaluation through the run's own rewards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rewards.builtins import MathVerify
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.types import Sample, SamplingParams

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def tidal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


def test_tidal_sft_trains_evaluates_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    """The loss falls, eval runs with the run's reward, the checkpoint loads."""
    args = [
        "configs/sft_arithmetic.yaml",
        "model.preset=tiny-qwen3-moe",
        "name=t",
        f"output_dir={tmp_path}",
        "sft.steps=30",
        "sft.log_every=5",
        "data.source.train_size=500",
        "data.source.eval_size=16",
        "trainer.micro_batch_size=16",
        "trainer.grad_accum=2",
        "trainer.zero_stage=2",
        "trainer.schedule.warmup_steps=2",
    ]
    r = tidal("sft", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
    assert [row["step"] for row in rows if "train/loss" in row] == [5, 10, 15, 20, 25, 30]
    summary = json.loads((run / "summary.json").read_text())
    # The arithmetic reward is 0 or 1 and a sample is correct at reward >= 1: accuracy is the mean reward.
    assert summary["eval/accuracy"] == summary["eval/reward"] and summary["eval/num_samples"] == 16
    assert summary["eval/accuracy_before"] == summary["eval/reward_before"]
    # Behavior log-probs of the engine and a teacher-forced forward of the same weights agree.
    assert summary["eval/logp_mismatch_mean"] < 1e-5
    assert "held-out accuracy" in r.stdout

    trained = load_model(run / "checkpoint")
    initial = load_model(materialize_preset("tiny-qwen3-moe", 0))
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters(), strict=True)]
    assert all(moved)
    assert (run / "checkpoint" / "tokenizer.json").is_file()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


# The model memorises these answers; the held-out file writes three of them another way (LaTeX, a
# decimal) and gets one wrong on purpose. Exact match would score 0 of 4; math-verify scores 3 of 4.
TRAIN = {"half=": "1/2", "three quarters=": "3/4", "two=": "2", "quarter=": "0.25"}
HELD_OUT = {"half=": r"\frac{1}{2}", "three quarters=": "0.75", "two=": r"\frac{4}{2}", "quarter=": r"\frac{1}{3}"}


def test_eval_accuracy_is_what_math_verify_says_of_the_completions(tmp_path: Path) -> None:
    for name, rows in (("train", TRAIN), ("eval", HELD_OUT)):
        lines = [json.dumps({"question": p, "solution": a}) for p, a in rows.items()]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines * (8 if name == "train" else 1)))
    args = [
        "configs/sft_arithmetic.yaml",
        "model.preset=tiny-qwen3-moe",
        "name=mv",
        f"output_dir={tmp_path}",
        "sft.steps=150",
        "sft.stop_at_accuracy=null",
        "data.source={type: files, train_files: ["
        + str(tmp_path / "train.jsonl")
        + "], eval_files: ["
        + str(tmp_path / "eval.jsonl")
        + "], prompt_field: question, answer_field: solution}",
        "trainer.micro_batch_size=32",
        "trainer.schedule.warmup_steps=5",
        "rewards.functions=[{name: math_verify}]",
        "eval.max_new_tokens=8",
        "monitor.wandb=disabled",
    ]
    r = tidal("sft", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "mv" / "summary.json").read_text())

    # The same greedy completions, scored here by math-verify directly.
    ckpt = tmp_path / "mv" / "checkpoint"
    tok = load_tokenizer(ckpt)
    engine = TransformersEngine(load_model(ckpt), tok)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in HELD_OUT]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert [o.text for o in outs] == list(TRAIN.values())  # memorised, so the LaTeX golds are really tested
    verify = MathVerify()
    verdicts = [
        verify(Sample(0, o.prompt_ids, o.token_ids, [1], [0.0], "stop", 0, [0], text=o.text), {"answer": a})
        for o, a in zip(outs, HELD_OUT.values(), strict=True)
    ]
    assert verdicts == [1.0, 1.0, 1.0, 0.0]
    assert summary["eval/accuracy"] == pytest.approx(sum(verdicts) / len(verdicts))
    assert summary["eval/reward"] == pytest.approx(0.75)
