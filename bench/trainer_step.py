"""Step time of the DeepSpeed trainer (ZeRO 0, ZeRO 2) against a plain torch AdamW loop.

All variants train their own copy of the same model on the same batch with the same micro-batch
split, clipping and token-mean loss. Steps are interleaved round-robin so that load from other
processes on the machine falls on every variant alike; warm-up steps are excluded and the median
of the timed steps is reported with its ratio to plain torch.

    .venv/bin/python bench/trainer_step.py [--steps 8] [--batch 16] [--seq 64] [--stages 0,2]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    from tidal.types import TokenBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, seq), generator=g)
    attention = torch.ones(batch, seq, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq, dtype=torch.long)
    prompt = torch.randint(seq // 8, seq // 2, (batch,), generator=g)
    for i, p in enumerate(prompt.tolist()):
        loss_mask[i, p:] = 1
    return TokenBatch(ids, attention, loss_mask)


def plain_torch_step_fn(model: torch.nn.Module, cfg, batch) -> Callable[[], None]:
    from tidal.modeling import micro_batches
    from tidal.trainer.losses_sft import num_targets, sft_loss

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

    def step() -> None:
        tokens = float(num_targets(batch.loss_mask))
        for micro in micro_batches(batch, cfg.micro_batch_size):
            loss_sum, _ = sft_loss(model, micro)
            (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-qwen3-moe")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--micro", type=int, default=8, help="micro-batch size")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    ap.add_argument("--stages", default="0,2", help="ZeRO stages to time, comma separated")
    args = ap.parse_args()

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from tidal.config import TrainerConfig
    from tidal.models import load_model, materialize_preset
    from tidal.trainer.engine import DeepSpeedTrainer

    path = materialize_preset(args.preset, seed=0)
    cfg = TrainerConfig(lr=1e-3, micro_batch_size=args.micro, grad_accum=max(1, args.batch // args.micro))
    model = load_model(path)
    batch = make_batch(args.batch, args.seq, model.config.vocab_size)

    variants: dict[str, Callable[[], object]] = {"torch AdamW": plain_torch_step_fn(model, cfg, batch)}
    for stage in [int(s) for s in args.stages.split(",")]:
        trainer = DeepSpeedTrainer(load_model(path), cfg.model_copy(update={"zero_stage": stage}))
        variants[f"deepspeed ZeRO-{stage}"] = lambda t=trainer: t.train_step(batch)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{args.preset} ({n_params / 1e6:.2f}M params), batch {args.batch}x{args.seq} tokens, "
        f"micro-batch {args.micro}, fp32, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"{platform.machine()}; median of {args.steps} steps after {args.warmup} warm-up"
    )
    base = statistics.median(times["torch AdamW"])
    print(f"{'variant':<18} {'median s':>9} {'min s':>8} {'max s':>8} {'vs torch':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18} {med:>9.4f} {min(ts):>8.4f} {max(ts):>8.4f} {med / base:>8.2f}x")


if __name__ == "__main__":
    main()
