"""`tidal sft`: supervised fine-tuning on (prompt, answer) pairs with the DeepSpeed trainer.

Evaluates held-out accuracy before and after (greedy answers scored by the run's rewards, as every
stage evaluates), and saves a Hugging Face checkpoint plus tokenizer under runs/<name>/checkpoint —
the warm start of RL.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from tidal.config import RunConfig, dump_config
from tidal.data import encode_prompts
from tidal.model.forward import pad, pad_tokens
from tidal.model.loading import load_model, load_tokenizer, resolve_model_dir
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.rollout.env_runtime import build_runtimes
from tidal.rollout.evaluate import evaluate
from tidal.stages.check import check_sft
from tidal.telemetry.metrics import values
from tidal.telemetry.monitor import Monitor
from tidal.types import Prompt, TokenBatch

if TYPE_CHECKING:
    from tidal.model.lora import apply_lora
    from tidal.trainer.engine import DeepSpeedTrainer

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
    ids, attn = pad_tokens([p + a for p, a in examples], pad_id)
    return TokenBatch(ids, attn, pad([[0] * len(p) + [1] * len(a) for p, a in examples]))


class HeldOut:
    """The held-out rows of an SFT run, evaluated as every stage does (`tidal.rollout.evaluate`):
    greedy answers scored by the run's `rewards.functions`."""

    def __init__(self, cfg: RunConfig, rows: list[dict[str, Any]]) -> None:
        self.cfg = cfg
        self.prompts = [Prompt(-1, row) for row in rows]
        self.runtimes = build_runtimes([], cfg.rewards, cfg.data)

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def evaluate(self, engine: TransformersEngine) -> dict[str, float]:
        out, _ = evaluate(engine, self.runtimes, self.prompts, self.cfg.eval, self.cfg.rollout, engine.model)
        return values(out)

    def evaluate_dir(self, model_dir: Path) -> dict[str, float]:
        # Evaluating a saved directory is what every later stage does, and sidesteps ZeRO-3 partitions.
        engine = TransformersEngine(
            load_model(model_dir, attn_implementation=self.cfg.model.attn_implementation), load_tokenizer(model_dir)
        )
        return self.evaluate(engine)

    def close(self) -> None:
        for rt in self.runtimes.values():
            rt.scorer.close()


def run_sft(cfg: RunConfig) -> dict[str, float]:
    """Train, evaluate before/after, save; returns the final summary metrics."""
    start = check_sft(cfg)  # every refusal of a config, before anything is written
    cfg, tokenizer, train_rows, eval_rows = start.cfg, start.tokenizer, start.train_rows, start.eval_rows
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model_dir = resolve_model_dir(cfg.model)
    examples = sft_examples(tokenizer, train_rows, cfg)
    held_out = HeldOut(cfg, eval_rows)
    monitor = Monitor.for_run(cfg.monitor, run_dir, cfg.name, cfg.model_dump(mode="json"), cfg.sft.steps)
    try:
        before = held_out.evaluate_dir(model_dir) if held_out else {}
        monitor.log({f"{k}_before" if k.startswith("eval/") else k: v for k, v in before.items()}, step=0)
        trainer = _train(cfg, model_dir, tokenizer, examples, held_out, monitor)
        ckpt = run_dir / "checkpoint"
        trainer.save_hf(ckpt, tokenizer)
        train_time = time.time() - t0
        after = held_out.evaluate_dir(ckpt) if held_out else {}
    finally:
        held_out.close()
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
    acc_b, acc_a = summary.get("eval/accuracy_before", float("nan")), summary.get("eval/accuracy", float("nan"))
    print(
        f"sft done in {summary['perf/wall_time_s']:.0f}s: held-out accuracy {acc_b:.1%} -> {acc_a:.1%}; "
        f"checkpoint at {ckpt}"
    )
    return summary


def _train(
    cfg: RunConfig,
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tuple[list[int], list[int]]],
    held_out: HeldOut,
    monitor: Monitor,
) -> DeepSpeedTrainer:
    """`sft.steps` optimizer steps over reshuffled epochs, stopping early at `sft.stop_at_accuracy`."""
    from tidal.trainer.engine import DeepSpeedTrainer

    attn = cfg.model.attn_implementation
    model = load_model(model_dir, attn_implementation=attn)
    if cfg.model.lora is not None:  # the checkpoint saved is the merged model
        model = apply_lora(model, cfg.model.lora)
    trainer = DeepSpeedTrainer(model, cfg.trainer, total_steps=cfg.sft.steps)
    stop_at = cfg.sft.stop_at_accuracy if held_out else None
    probe = TransformersEngine(load_model(model_dir, attn_implementation=attn), tokenizer) if stop_at else None
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
        metrics = values(trainer.train_step(batch))
        if step % cfg.sft.log_every == 0 or step == cfg.sft.steps:
            monitor.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if probe is not None and stop_at is not None and step % cfg.sft.eval_every == 0:
            probe.load_weights(trainer.state_dict_for_export(), trainer.version)
            accuracy = held_out.evaluate(probe)["eval/accuracy"]
            monitor.log({"eval/probe_accuracy": accuracy}, step=step)
            if accuracy >= stop_at:
                log.info("held-out accuracy %.1f%% reached sft.stop_at_accuracy at step %d", 100 * accuracy, step)
                break
    return trainer
