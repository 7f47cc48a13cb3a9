"""`tidal sft`: supervised fine-tuning on (prompt, answer) pairs with the DeepSpeed trainer.

Evaluates held-out accuracy with the rollout engine before and after, and saves a Hugging Face
checkpoint plus tokenizer under runs/<name>/checkpoint — the warm start of RL.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tidal.config import RunConfig, dump_config
from tidal.data import encode_prompts, load_splits
from tidal.models import load_model, load_tokenizer, resolve_model_dir
from tidal.monitor import Monitor
from tidal.rollout.engine import TransformersEngine
from tidal.rollout.evaluate import evaluate
from tidal.types import TokenBatch

log = logging.getLogger(__name__)


def sft_examples(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], cfg: RunConfig
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + eos) per row; the answer part is what the loss trains."""
    prompts = encode_prompts(tokenizer, rows, cfg.data)
    eos = tokenizer.eos_token_id
    return [
        (p, tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [eos])
        for p, r in zip(prompts, rows, strict=True)
    ]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> TokenBatch:
    """Right-pad prompt+answer sequences; loss_mask marks the answer tokens."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attn[i, : len(p) + len(a)] = 1
        loss[i, len(p) : len(p) + len(a)] = 1
    return TokenBatch(ids, attn, loss)


def _evaluate_dir(model_dir: Path, eval_rows: list[dict[str, Any]], cfg: RunConfig) -> dict[str, float]:
    # Evaluating a saved directory is what every later stage does, and sidesteps ZeRO-3 partitions.
    engine = TransformersEngine(load_model(model_dir), load_tokenizer(model_dir))
    return evaluate(engine, eval_rows, cfg.data, cfg.eval)


def run_sft(cfg: RunConfig) -> dict[str, float]:
    """Train, evaluate before/after, save; returns the final summary metrics."""
    from tidal.trainer.engine import DeepSpeedTrainer

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    train_ds, eval_ds = load_splits(cfg.data)
    eval_rows = eval_ds.to_list() if eval_ds is not None else []
    examples = sft_examples(tokenizer, train_ds.to_list(), cfg)
    monitor = Monitor.for_run(cfg.monitor, run_dir, cfg.name, cfg.model_dump(mode="json"), cfg.sft.steps)

    before = _evaluate_dir(model_dir, eval_rows, cfg) if eval_rows else {}
    monitor.log({f"{k}_before" if k.startswith("eval/") else k: v for k, v in before.items()}, step=0)

    trainer = DeepSpeedTrainer(load_model(model_dir), cfg.trainer, total_steps=cfg.sft.steps)
    stop_at = cfg.sft.stop_at_accuracy if eval_rows else None
    probe = TransformersEngine(load_model(model_dir), tokenizer) if stop_at is not None else None
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
    order = list(range(len(examples)))
    cursor = len(order)
    rng = random.Random(cfg.seed)
    for step in range(1, cfg.sft.steps + 1):
        if cursor + per_step > len(order):  # a new epoch: reshuffle
            rng.shuffle(order)
            cursor = 0
        batch = collate([examples[i] for i in order[cursor : cursor + per_step]], tokenizer.pad_token_id)
        cursor += per_step
        metrics = trainer.train_step(batch)
        if step % cfg.sft.log_every == 0 or step == cfg.sft.steps:
            monitor.log({f"train/{k}": float(v) for k, v in metrics.items()}, step=step)
        if probe is not None and stop_at is not None and step % cfg.sft.eval_every == 0:
            probe.model.load_state_dict(trainer.state_dict_for_export())
            accuracy = evaluate(probe, eval_rows, cfg.data, cfg.eval)["eval/accuracy"]
            monitor.log({"eval/probe_accuracy": accuracy}, step=step)
            if accuracy >= stop_at:
                log.info("held-out accuracy %.1f%% reached sft.stop_at_accuracy at step %d", 100 * accuracy, step)
                break

    ckpt = run_dir / "checkpoint"
    trainer.save_hf(ckpt, tokenizer)
    train_time = time.time() - t0
    after = _evaluate_dir(ckpt, eval_rows, cfg) if eval_rows else {}
    summary = {
        **{f"{k}_before": v for k, v in before.items() if k.startswith("eval/")},
        **after,
        "perf/wall_time_s": time.time() - t0,
        "perf/train_time_s": train_time,
        "train/steps": float(trainer.version),
    }
    monitor.log(summary, step=trainer.version)
    monitor.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    acc_b, acc_a = (
        summary.get("eval/accuracy_before", float("nan")),
        summary.get("eval/accuracy", float("nan")),
    )
    print(f"sft done in {summary['perf/wall_time_s']:.0f}s: held-out accuracy {acc_b:.1%} -> {acc_a:.1%}; "
          f"checkpoint at {ckpt}")  # fmt: skip
    return summary
