"""What a checkpoint costs: the trainer's save and load against plain torch.save / torch.load of the
same tensors, and how long a save pauses the trainer and the workers inside a real run.

Part 1, per model (the tiny preset and a ~500 MB MoE built from config): a DeepSpeed engine (ZeRO
0, fp32, AdamW after one step, so the optimizer holds its moments) saves with DeepSpeed's
`save_checkpoint` and loads with `load_checkpoint` (what `train.checkpoint_every` and
`train.resume` use), against `torch.save` of the module's and the optimizer's state dicts to one
file and `torch.load` + `load_state_dict` of them. Rounds interleave the two; medians are reported.

Part 2: `tidal train` on the tiny preset with a checkpoint every 2 steps against none, side by side:
each checkpoint's drain (the driver lets the groups in flight land; the workers finish them), state
write (no new work dispatched), the trainer's DeepSpeed write (the workers generate the next
batches meanwhile) and what of it the driver waited for, and the runs' loop times.

    .venv/bin/python bench/checkpoint.py [--rounds 3] [--sizes tiny,500mb] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(size: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tidal.model.loading import build_char_tokenizer, load_model, materialize_preset, preset_config

    if size == "tiny":
        return load_model(materialize_preset("tiny-qwen3-moe", seed=0))
    tok = build_char_tokenizer()
    base = preset_config("tiny-qwen3-moe", tok).to_dict()
    base.update(
        hidden_size=768,
        intermediate_size=1536,
        moe_intermediate_size=768,
        num_hidden_layers=9,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    )  # 8 experts: ~135M params, ~540 MB
    base.pop("model_type", None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **base), dtype=torch.float32)


def engine_for(model: torch.nn.Module):
    from tidal.config import TrainerConfig
    from tidal.trainer.engine import DeepSpeedTrainer

    trainer = DeepSpeedTrainer(model, TrainerConfig(lr=1e-5, zero_stage=0, micro_batch_size=2))
    ids = torch.randint(6, model.config.vocab_size, (2, 16))
    loss = trainer.engine(input_ids=ids, labels=ids).loss
    trainer.engine.backward(loss)
    trainer.engine.step()  # AdamW now holds its two moments per parameter
    return trainer.engine


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def time_save_load(size: str, rounds: int, root: Path) -> dict[str, float]:
    engine = engine_for(build_model(size))
    params = sum(p.numel() for p in engine.module.parameters())
    times: dict[str, list[float]] = {"ds_save": [], "torch_save": [], "ds_load": [], "torch_load": []}
    sizes = {}
    for r in range(rounds):
        ds_dir, pt = root / f"{size}-ds-{r}", root / f"{size}-{r}.pt"
        t0 = time.perf_counter()
        engine.save_checkpoint(str(ds_dir), tag="trainer", save_latest=False)
        times["ds_save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.save({"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, pt)
        times["torch_save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.load_checkpoint(str(ds_dir), tag="trainer")
        times["ds_load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = torch.load(pt, weights_only=True)
        engine.module.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        times["torch_load"].append(time.perf_counter() - t0)
        sizes = {"ds_mb": disk_bytes(ds_dir) / 2**20, "torch_mb": disk_bytes(pt) / 2**20}
        shutil.rmtree(ds_dir)
        pt.unlink()
    return {"params_m": params / 1e6, **sizes, **{k: statistics.median(v) for k, v in times.items()}}


def run_pauses(steps: int, root: Path) -> dict[str, dict[str, float]]:
    from tidal.config import load_config
    from tidal.stages.train import run_train

    out = {}
    for every in (0, 2):
        cfg = load_config(
            None,
            [
                "model.preset=tiny-qwen3-moe",
                "data.source.ops=[+]",
                "data.source.eval_size=8",
                f"name=ckpt-every-{every}",
                f"output_dir={root / 'runs'}",
                "rollout.max_new_tokens=4",
                "rollout.group_size=4",
                "rollout.prompts_per_step=8",
                "rollout.num_workers=2",
                "rollout.max_staleness=1",
                "trainer.lr=1e-3",
                "trainer.micro_batch_size=32",
                "train.eval_every=0",
                "eval.num_samples=8",
                "monitor.wandb=disabled",
                "train.save_checkpoint=false",
                f"train.steps={steps}",
                "filter.zero_variance=false",  # the random-init model's rewards are all 0: every step still trains
                f"train.checkpoint_every={every}",
            ],
        )
        summary = run_train(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        keys = [
            "perf/checkpoint_drain_s",
            "perf/checkpoint_state_s",
            "perf/checkpoint_trainer_s",
            "perf/checkpoint_wait_s",
        ]
        per = {k: [r[k] for r in rows if k in r] for k in keys}  # the last step's are in the summary row
        out[every] = {
            "loop_s": summary["perf/loop_s"],
            "checkpoints": len(per[keys[0]]),
            **{k.split("/")[1]: statistics.median(v) if v else 0.0 for k, v in per.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="tiny,500mb")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TIDAL_CACHE", str(Path(tempfile.gettempdir()) / "tidal-bench-cache"))
    root = Path(tempfile.mkdtemp(prefix="tidal-ckpt-"))
    try:
        print("model      params  on disk (DeepSpeed / torch)  save (DS / torch = ratio)   load (DS / torch = ratio)")
        for size in args.sizes.split(","):
            r = time_save_load(size, args.rounds, root)
            save, load = r["ds_save"] / r["torch_save"], r["ds_load"] / r["torch_load"]
            print(
                f"{size:8s} {r['params_m']:7.1f}M  {r['ds_mb']:8.1f} / {r['torch_mb']:8.1f} MB     "
                f"{r['ds_save']:6.2f} / {r['torch_save']:6.2f} s = {save:4.2f}x   "
                f"{r['ds_load']:6.2f} / {r['torch_load']:6.2f} s = {load:4.2f}x"
            )
        runs = run_pauses(args.steps, root)
        a, b = runs[0], runs[2]
        print(
            f"\ntidal train, tiny preset, {args.steps} steps: loop {a['loop_s']:.1f} s without checkpoints, "
            f"{b['loop_s']:.1f} s with one every 2 steps ({b['checkpoints']} checkpoints, "
            f"{b['loop_s'] / a['loop_s']:.2f}x)"
        )
        print(
            f"per checkpoint (median): drain {b['checkpoint_drain_s']:.2f} s (workers finish the groups in flight), "
            f"state write {b['checkpoint_state_s']:.3f} s (nothing new dispatched), trainer's DeepSpeed write "
            f"{b['checkpoint_trainer_s']:.2f} s (the workers generate meanwhile), of which the driver waited "
            f"{b['checkpoint_wait_s']:.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
