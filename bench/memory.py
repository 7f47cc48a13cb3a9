"""A trainer rank's measured peak memory on this machine against `tidal plan`'s figure (issue 30).

Each case runs in a fresh process: it builds a Qwen3-MoE-architecture model from config (no
download), a `DeepSpeedTrainer` (ZeRO-0, fp32, torch AdamW, on the CPU) and an RL loss, runs two
steps on a batch of `rows` rows of `length` tokens (the optimizer's states appear at the first), and
reports the growth of its resident memory's high-water mark (VmHWM) over its resident memory before
the model was built, against the plan's trainer total for the same config (weights, gradients,
optimizer states and the step's temporaries, activations, a layer's backward, the log-prob chunk).
Then the uneven batch of long chains of thought (1 row of 2,048 tokens and 7 of 128, 2,944 tokens)
against an even batch of 8 x 512 (4,096 tokens), without and with a token budget of 2,048; and
long-tailed lengths (1,024 down to 20 tokens, 2,256 in all) under that budget, padded and packed.

    .venv/bin/python bench/memory.py [--cases small-256x8,...] [--quick]

A case is SIZE-LENGTHxROWS[-ckpt][-budgetN][-packed] (packed: `trainer.packing`, the budget's rows
run as one sequence of their tokens); SIZE is small (~20M parameters), medium (~140M) or
large (~390M).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

SIZES = {
    # hidden, layers, experts, top-k, expert width, heads, kv heads
    "small": (256, 4, 8, 2, 256, 4, 2),
    "medium": (512, 8, 16, 2, 512, 8, 4),
    "large": (1024, 8, 16, 2, 768, 16, 4),
}
VOCAB = 32000
DEFAULT_CASES = [
    "small-256x8",
    "small-1024x8",
    "small-4096x2",
    "small-4096x2-ckpt",
    "medium-1024x4",
    "medium-4096x2",
    "medium-4096x2-ckpt",
    "large-1024x2",
    "large-2048x2-ckpt",
]
UNEVEN_CASES = [
    "small-even512x8",
    "small-uneven",
    "small-even512x8-budget2048",
    "small-uneven-budget2048",
    "small-tail-budget2048",
    "small-tail-budget2048-packed",
]


def model_config(size: str) -> Any:
    from transformers import AutoConfig

    hidden, layers, experts, top_k, width, heads, kv_heads = SIZES[size]
    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * width,
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def parse(case: str) -> dict[str, Any]:
    size, shape, *flags = case.split("-")
    out: dict[str, Any] = {"size": size, "ckpt": "ckpt" in flags, "packed": "packed" in flags, "budget": None}
    for f in flags:
        if f.startswith("budget"):
            out["budget"] = int(f.removeprefix("budget"))
    if shape == "uneven":
        out["lengths"] = [2048] + [128] * 7
    elif shape == "tail":  # long-tailed lengths, as the long task's answers
        out["lengths"] = [1024, 512, 300, 200, 100, 60, 40, 20]
    elif shape.startswith("even"):
        length, rows = shape.removeprefix("even").split("x")
        out["lengths"] = [int(length)] * int(rows)
    else:
        length, rows = shape.split("x")
        out["lengths"] = [int(length)] * int(rows)
    return out


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(case: str) -> dict[str, Any]:
    """Run one case in this process; its measured peak growth and the plan's figures."""
    import torch

    from tidal.config import LossConfig, load_config
    from tidal.model.memory import Architecture, plan_memory
    from tidal.telemetry.metrics import values
    from tidal.trainer.engine import DeepSpeedTrainer
    from tidal.trainer.rl import RLLoss
    from tidal.types import TrainBatch

    spec = parse(case)
    lengths = spec["lengths"]
    width, rows = max(lengths), len(lengths)
    config = model_config(spec["size"])
    arch = Architecture.of(config)
    overrides = [
        f"trainer.micro_batch_size={rows}",
        f"rollout.max_new_tokens={width // 2}",
        "trainer.lr=1e-4",
        f"trainer.activation_checkpointing={str(spec['ckpt']).lower()}",
    ]
    if spec["budget"]:
        overrides.append(f"trainer.max_tokens_per_micro_batch={spec['budget']}")
    if spec["packed"]:
        overrides.append("trainer.packing=true")
    cfg = load_config(None, overrides).for_rl()
    plan = plan_memory(cfg, arch, prompt_tokens=width - width // 2)
    if spec["budget"] is None:
        plan_tokens = rows * width  # the plan assumes every row as long as the longest
    else:
        plan_tokens = plan.micro_tokens

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, VOCAB, (rows, width), generator=g)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    mask = attn.clone()
    mask[:, :8] = 0
    logp_mu = torch.where(mask.bool(), -3.0, 0.0)
    batch = TrainBatch(
        ids,
        attn,
        mask,
        logp_mu=logp_mu,
        advantages=torch.randn(rows, 1, generator=g).expand(rows, width).contiguous() * mask,
        versions=torch.zeros_like(ids),
    )
    # Everything a step imports, imported before the baseline: only the model and the step count.
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
    from transformers import AutoModelForCausalLM

    from tidal.trainer.prepare import init_distributed

    init_distributed()
    baseline = status_kb("VmRSS")
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    trainer = DeepSpeedTrainer(model, cfg.trainer)
    loss = RLLoss(LossConfig(), temperature=1.0, max_len=width)
    t0 = time.perf_counter()
    for _ in range(2):
        metrics = values(trainer.train_step(batch, loss_fn=loss))
    seconds = (time.perf_counter() - t0) / 2
    peak = status_kb("VmHWM") - baseline
    planned = plan.trainer_total
    return {
        "case": case,
        "params_m": arch.params / 1e6,
        "tokens": int(attn.sum()),
        "plan_tokens": plan_tokens,
        "measured_gb": peak / 2**30,
        "planned_gb": planned / 2**30,
        "ratio": peak / planned,
        "parts_gb": {k: v / 2**30 for k, v in plan.trainer.items()},
        "step_s": seconds,
        "loss": metrics["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES + UNEVEN_CASES))
    parser.add_argument("--quick", action="store_true", help="the small cases only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    cases = args.cases.split(",")
    if args.quick:
        cases = [c for c in cases if c.startswith("small")]
    # glibc returns large freed blocks to the system only above its mmap threshold, which it raises as
    # it goes: a second micro-batch as large as the first would then count twice in the resident
    # high-water mark. A fixed 64 KiB threshold makes the mark follow the live tensors, as
    # torch.cuda.max_memory_allocated does on a GPU.
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        TRANSFORMERS_VERBOSITY="error",
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    print(f"{'case':<28} {'params':>8} {'tokens':>7} {'planned':>9} {'measured':>9} {'ratio':>6} {'step s':>7}")
    for case in cases:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", case], capture_output=True, text=True, env=env, timeout=3600
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{case:<28} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
            continue
        r = json.loads(lines[-1].removeprefix("RESULT "))
        print(
            f"{case:<28} {r['params_m']:>7.1f}M {r['tokens']:>7} {r['planned_gb']:>8.2f}G {r['measured_gb']:>8.2f}G "
            f"{r['ratio']:>6.2f} {r['step_s']:>7.1f}",
            flush=True,
        )
        print("    plan: " + ", ".join(f"{k} {v:.2f}G" for k, v in r["parts_gb"].items()), flush=True)


if __name__ == "__main__":
    main()
