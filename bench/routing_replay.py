"""Rollout routing replay (R3): how far the trainer's routing and log-probs drift from rollout's, with
and without replaying rollout's routing, what replay costs per train step, and a short run's reward.

Routing disagrees here the way it does in practice: the rollout engine runs the policy in bf16, the
trainer in fp32 (`model.dtype: bfloat16` does exactly this in a run).

Part 1, per preset (tiny GLM-4.5 and Qwen3-MoE, random init): a bf16 engine samples groups with
routing records; an fp32 copy of the same weights scores them. Reported: the share of (token, MoE
layer) whose top-k expert set the trainer picks as rollout did (`moe/routing_agreement`), the mean
|log-prob difference| between trainer and rollout on the sampled tokens, and two estimates of the
train-inference KL(mu || pi) from those tokens (k1 = mean(log mu - log pi), k3 = mean(exp(-d) - 1 + d)),
without and with r3. Then the time of an RL update (forward + backward of the GRPO loss) with and
without replay, interleaved rounds, medians and their ratio.

Part 2 (`--steps N`, 0 to skip): the quickstart (SFT warm start, cached after the first time) with a
bf16 rollout engine, `routing_replay: none` against `r3`, N steps each: the reward curve every N/10
steps and the held-out accuracy.

    .venv/bin/python bench/routing_replay.py [--presets tiny-glm4-moe,tiny-qwen3-moe] [--rounds 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def sampled_batch(preset: str, prompts: int, group_size: int, max_new_tokens: int):
    """(fp32 model, TrainBatch) of groups a bf16 engine of the same weights sampled, routing recorded."""
    from tidal.model.loading import load_model, load_tokenizer, materialize_preset
    from tidal.rollout.engines.transformers import TransformersEngine
    from tidal.trainer.rl import build_batch
    from tidal.types import Group, Sample, SamplingParams

    path = materialize_preset(preset, seed=0)
    tok = load_tokenizer(path)
    engine = TransformersEngine(load_model(path, torch.bfloat16), tok)
    rows = [tok.encode(f"{i}+{i + 1}=") for i in range(prompts) for _ in range(group_size)]
    outs = engine.generate(
        rows, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=0), record_routing=True
    )
    samples = [
        Sample(
            i // group_size,
            c.prompt_ids,
            c.token_ids,
            [1] * len(c.token_ids),
            c.logprobs,
            c.finish_reason,
            0,
            [0] * len(c.token_ids),
            reward=float(i % 2),
            routing=c.routing,
        )
        for i, c in enumerate(outs)
    ]
    groups = [Group(g, [s.for_training() for s in samples if s.group_id == g]) for g in range(prompts)]
    batch, _ = build_batch(groups, "grpo", tok.pad_token_id)
    return load_model(path), batch


def drift(model: torch.nn.Module, batch, replay: bool) -> dict[str, float]:
    from tidal.model.forward import batch_logprobs
    from tidal.model.routing import RoutingRecorder, recorded_positions, replay_recorded, routing_health
    from tidal.telemetry.metrics import values

    around = partial(replay_recorded, model) if replay else None
    with torch.no_grad():
        logp = batch_logprobs(model, batch, 1.0, 64, around)
    mask = batch.loss_mask.bool()
    d = (batch.logp_mu - logp)[mask]  # log mu - log pi on tokens sampled from mu
    if replay:  # the trainer routes as recorded wherever something was recorded
        with RoutingRecorder(model) as recorder, replay_recorded(model, batch), torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            mine = recorder.take().view(*batch.input_ids.shape, *batch.routing.shape[2:])
        where = recorded_positions(batch)
        same = (mine[where].long().sort(-1).values == batch.routing[where].long().sort(-1).values).all(-1)
        agreement = float(same.float().mean())
    else:
        agreement = values(routing_health(model, batch, 64))["moe/routing_agreement"]
    return {
        "agreement": agreement,
        "dlogp": float(d.abs().mean()),
        "k1": float(d.mean()),
        "k3": float((torch.exp(-d) - 1 + d).mean()),
    }


def update_times(model: torch.nn.Module, batch, rounds: int) -> dict[str, float]:
    from tidal.config import LossConfig
    from tidal.trainer.rl import RLLoss

    batch.logp_old = batch.logp_mu.clone()
    losses = {"none": RLLoss(LossConfig(), 1.0, 16), "r3": RLLoss(LossConfig(), 1.0, 16, replay=True)}
    times: dict[str, list[float]] = {k: [] for k in losses}
    for r in range(rounds + 1):
        for name, loss_fn in losses.items():
            t0 = time.perf_counter()
            numerator, _ = loss_fn(model, batch)
            numerator.backward()
            model.zero_grad(set_to_none=True)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def quickstart_runs(steps: int, root: Path) -> dict[str, dict]:
    from tidal.config import load_config
    from tidal.stages.train import run_train

    out = {}
    for replay in ("none", "r3"):
        cfg = load_config(
            Path(__file__).parent.parent / "configs" / "quickstart.yaml",
            [
                f"name=r3-{replay}",
                f"output_dir={root}",
                "model.dtype=bfloat16",
                f"algorithm.routing_replay={replay}",
                "rollout.record_routing=true",
                f"train.steps={steps}",
                f"train.eval_every={max(steps // 4, 1)}",
                "monitor.wandb=disabled",
                "train.save_checkpoint=false",
            ],
        )
        summary = run_train(cfg)
        rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps_rows = [r for r in rows if "train/version" in r]
        out[replay] = {"summary": summary, "rows": steps_rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-glm4-moe,tiny-qwen3-moe")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TIDAL_CACHE", str(Path(tempfile.gettempdir()) / "tidal-bench-cache"))
    torch.manual_seed(0)
    print(
        "bf16 rollout, fp32 trainer          routing agreement   mean |dlogp|        KL k1 / k3 (x1e-4)"
        "        update time (s)"
    )
    for preset in args.presets.split(","):
        model, batch = sampled_batch(preset, args.prompts, args.group_size, args.max_new_tokens)
        a, b = drift(model, batch, replay=False), drift(model, batch, replay=True)
        t = update_times(model, batch, args.rounds)
        print(
            f"{preset:15s} none -> r3:  {a['agreement']:.4f} -> {b['agreement']:.4f}   "
            f"{a['dlogp']:.2e} -> {b['dlogp']:.2e}   {a['k1'] * 1e4:+.2f}/{a['k3'] * 1e4:.2f} -> "
            f"{b['k1'] * 1e4:+.2f}/{b['k3'] * 1e4:.2f}   {t['none']:.3f} -> {t['r3']:.3f} "
            f"({t['r3'] / t['none'] - 1:+.1%})"
        )
    if args.steps:
        runs = quickstart_runs(args.steps, Path(tempfile.mkdtemp(prefix="tidal-r3-")))
        print(f"\nquickstart, bf16 rollout, {args.steps} steps: reward (mean of each tenth of the run)")
        for name, run in runs.items():
            rewards = [r["reward/mean"] for r in run["rows"] if "reward/mean" in r]
            tenth = max(len(rewards) // 10, 1)
            curve = [statistics.mean(rewards[i : i + tenth]) for i in range(0, len(rewards), tenth)]
            s = run["summary"]
            agree = statistics.mean(r["moe/routing_agreement"] for r in run["rows"] if "moe/routing_agreement" in r)
            print(
                f"  {name:4s} "
                + " ".join(f"{x:.3f}" for x in curve)
                + f"   held-out {s['eval/accuracy_before']:.1%} -> {s['eval/accuracy']:.1%}, routing agreement "
                f"{agree:.4f}, loop {s['perf/loop_s']:.0f} s"
            )


if __name__ == "__main__":
    main()
