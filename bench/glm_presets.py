"""Why do the GLM presets learn the quickstart SFT task slower than tiny-qwen3-moe? (issue 18, point 5)

Each variant is a preset config (`tidal.model.loading.preset_config`) with some fields changed, built with
the preset's init seed and trained with the quickstart recipe (configs/sft_arithmetic.yaml: lr 3e-3,
cosine over `sft.steps`, held-out accuracy every 10 steps) through tidal.stages.sft's own pieces. A run
stops at `--stop` held-out accuracy or after `--cap` steps (the lr schedule still spans the
recipe's `sft.steps`, so the first `--cap` steps are those of the real recipe). Router load is
measured on a fixed training batch at init and at the end: per MoE layer, the share of top-k slots of the
busiest expert (relative to uniform, 1.0 = balanced, 4.0 = 8 experts top-2 all on 2 experts) and
the normalized entropy of the load (1.0 = balanced).

    OMP_NUM_THREADS=1 .venv/bin/python bench/glm_presets.py --variants qwen3,glm4-old,glm4 --seeds 0,1

Prints one row per (variant, seed): step at which `--stop` was reached (or "-"), accuracy at the
last check, train loss at the last logged step, router load.

Measured (2 CPU cores shared, OMP_NUM_THREADS=1, --cap 800; init seed 0, data seed = seed; "-" = not
reached, then accuracy at step 800; names as in VARIANTS now, where "glm4" has QK-norm):

    variant        seed 0        seed 1       loss at stop/800
    qwen3          450           400 (CLI)    0.56
    glm4-old       - (15.0%)     700          0.66 / 0.57
    glm4           470           470          0.58 / 0.59
    glm4+bias      690           850 (CLI)    0.58 / 0.60
    glm5           - (8.5%)                   0.71
    glm5+rope32    - (14.5%)                  0.74

Router load at the end is alike in all (busiest expert 2.3-3.7x uniform, normalized entropy
0.57-0.73; qwen3 3.68 / 0.60), so routing collapse does not explain the gap. The sequences are 7-10
tokens, below glm5's index_topk (64): DSA selects every token, and is not the cause either.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Presets with changed fields: name -> (preset, {config field: value}). `partial_rotary_factor`
# lives in `rope_parameters` in transformers 5.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("tiny-qwen3-moe", {}),
    "glm4": ("tiny-glm4-moe", {}),  # QK-norm, as zai-org/GLM-4.5
    "glm4+bias": ("tiny-glm4-moe", {"attention_bias": True}),  # + the real models' qkv bias
    "glm4-old": ("tiny-glm4-moe", {"use_qk_norm": False}),  # the preset before issue 18
    "glm4-old+rope1": ("tiny-glm4-moe", {"use_qk_norm": False, "partial_rotary_factor": 1.0}),
    "glm4-nodense": ("tiny-glm4-moe", {"first_k_dense_replace": 0}),
    "glm4-noshared": ("tiny-glm4-moe", {"n_shared_experts": 0}),
    "glm5": ("tiny-glm5-moe", {}),
    "glm5+rope32": ("tiny-glm5-moe", {"qk_rope_head_dim": 32, "head_dim": 32}),
    "glm5-nodense": ("tiny-glm5-moe", {"first_k_dense_replace": 0}),
}


def build_variant(name: str, init_seed: int, root: Path) -> Path:
    """save_pretrained directory of variant `name` (model + tokenizer)."""
    from transformers import AutoModelForCausalLM

    from tidal.model.loading import build_char_tokenizer, preset_config

    preset, changes = VARIANTS[name]
    tok = build_char_tokenizer()
    config = preset_config(preset, tok)
    for key, value in changes.items():
        if key == "partial_rotary_factor":
            config.rope_parameters = {**config.rope_parameters, key: value}
        setattr(config, key, value)
    torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = root / f"{name}-s{init_seed}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def router_load(model: torch.nn.Module, batch: Any) -> tuple[float, float]:
    """(max over MoE layers of the busiest expert's load, min over layers of the load's normalized
    entropy) of the top-k choices on `batch`'s attended tokens."""
    picks: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: picks.append(out[-1].detach()))
        for n, m in model.named_modules()
        if n.endswith("mlp.gate") and not isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for h in hooks:
        h.remove()
    keep = batch.attention_mask.reshape(-1).bool()
    worst_load, worst_entropy = 0.0, 1.0
    for idx in picks:  # (B*T, k)
        e = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.n_routed_experts
        counts = torch.bincount(idx[keep].reshape(-1), minlength=e).float()
        p = counts / counts.sum()
        worst_load = max(worst_load, float(p.max() * e))
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(e))
        worst_entropy = min(worst_entropy, entropy)
    return worst_load, worst_entropy


def run(name: str, seed: int, cap: int, stop: float, root: Path) -> dict[str, Any]:
    from tidal.config import load_config
    from tidal.data import load_splits
    from tidal.model.loading import load_model, load_tokenizer
    from tidal.rollout.engines.transformers import TransformersEngine
    from tidal.stages.sft import HeldOut, collate, sft_examples
    from tidal.telemetry.metrics import values
    from tidal.trainer.engine import DeepSpeedTrainer

    model_dir = build_variant(name, 0, root)
    overrides = [
        "model.preset=null",
        f"model.path={model_dir}",
        f"seed={seed}",
        f"name=glmprobe-{name}-{seed}",
        f"output_dir={root / 'runs'}",
        "monitor.wandb=disabled",
    ]
    cfg = load_config("configs/sft_arithmetic.yaml", overrides).for_sft()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_dir)
    train_ds, eval_ds = load_splits(cfg.data)
    examples = sft_examples(tokenizer, train_ds.to_list(), cfg)
    held_out = HeldOut(cfg, eval_ds.to_list())
    trainer = DeepSpeedTrainer(load_model(model_dir), cfg.trainer, total_steps=cfg.sft.steps)
    probe = TransformersEngine(load_model(model_dir), tokenizer)
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
    order, cursor, rng = list(range(len(examples))), len(examples), random.Random(cfg.seed)
    reached, accuracy, loss = None, float("nan"), float("nan")
    first_batch = collate([examples[i] for i in range(per_step)], tokenizer.pad_token_id)
    init_load = router_load(probe.model, first_batch)
    t0 = time.time()
    for step in range(1, min(cap, cfg.sft.steps) + 1):
        if cursor + per_step > len(order):
            rng.shuffle(order)
            cursor = 0
        batch = collate([examples[i] for i in order[cursor : cursor + per_step]], tokenizer.pad_token_id)
        cursor += per_step
        loss = values(trainer.train_step(batch))["loss"]
        if step % cfg.sft.eval_every == 0:
            probe.load_weights(trainer.state_dict_for_export(), trainer.version)
            accuracy = held_out.evaluate(probe)["eval/accuracy"]
            if accuracy >= stop:
                reached = step
                break
    seconds = time.time() - t0
    held_out.close()
    load, entropy = router_load(probe.model, first_batch)
    return {
        "variant": name,
        "seed": seed,
        "reached": reached,
        "steps": step,
        "accuracy": accuracy,
        "loss": loss,
        "load_max": load,
        "load_entropy": entropy,
        "init_load": init_load,
        "s_per_step": seconds / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="qwen3,glm4-old,glm4", help=f"comma list of {sorted(VARIANTS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--cap", type=int, default=800, help="most steps per run")
    parser.add_argument("--stop", type=float, default=0.3, help="held-out accuracy that ends a run")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = Path(tempfile.mkdtemp(prefix="glmprobe-"))
    print(
        f"{'variant':<20} {'seed':>4} {'to ' + format(args.stop, '.0%'):>6} {'steps':>5} {'acc':>6} "
        f"{'loss':>7} {'load_max':>8} {'load_H':>6} {'init_max':>8} {'init_H':>6} {'s/step':>6}",
        flush=True,
    )
    try:
        for name in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = run(name, seed, args.cap, args.stop, root)
                print(
                    f"{r['variant']:<20} {r['seed']:>4} {r['reached'] or '-':>6} {r['steps']:>5} "
                    f"{r['accuracy']:>6.1%} {r['loss']:>7.4f} {r['load_max']:>8.2f} {r['load_entropy']:>6.3f} "
                    f"{r['init_load'][0]:>8.2f} {r['init_load'][1]:>6.3f} {r['s_per_step']:>6.3f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
