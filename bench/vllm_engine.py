"""The vLLM rollout engine against the transformers engine: generated tokens/s, and weight-update time.

Throughput: both engines, each in its own Ray actor with the same torch thread count, generate the
same batch (`--prompts` random prompts x `--group` completions, `--new-tokens` each with eos
ignored, so the token counts are equal and checked) at temperature 1. Calls alternate between the
engines and the median of `--repeats` is reported after one warm-up call each.

Weight update: the time `load_weights` takes for a full state dict, against the model's bytes, for
the tiny preset and a ~500 MB fp32 Qwen3-MoE (the preset's config scaled up): vLLM in-process
(tensors handed over), vLLM with its engine subprocess (a safetensors file in /dev/shm), the
transformers engine (`load_state_dict`), and a plain `clone()` of the state dict (median of 3
after one warm-up) as the floor.
Each is checked: vLLM's greedy log-probs after the update match a transformers forward of the new
weights within 1e-4.

    .venv/bin/python bench/vllm_engine.py [--prompts 64] [--group 8] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from tidal.config import VLLMConfig
from tidal.model.forward import completion_logprobs
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.types import SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny-qwen3-moe", "tiny-glm4-moe"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each engine's actor")
    p.add_argument("--layers", type=int, default=18, help="layers of the large model (18: ~510 MB)")
    p.add_argument("--skip-large", action="store_true", help="only the tiny preset's weight update")
    return p.parse_args()


@ray.remote(num_cpus=1)
class Host:
    """One engine in its own process (vLLM's CPU worker pins threads process-wide)."""

    def __init__(self, kind: str, model_dir: str, threads: int, in_process: bool = True) -> None:
        torch.set_num_threads(threads)
        tok = load_tokenizer(model_dir)
        if kind == "vllm":
            from tidal.rollout.engines.vllm import VLLMEngine

            self.engine: Any = VLLMEngine(model_dir, tok, VLLMConfig(in_process=in_process, kv_cache_gb=1.0))
        else:
            self.engine = TransformersEngine(load_model(model_dir), tok)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, params)
        return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)

    def greedy(self, prompts: list[list[int]]) -> list[Any]:
        return self.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8))

    def time_update(self, state_ref: list[Any], version: int) -> float:
        state = ray.get(state_ref[0])  # fetched before the clock starts: only the load is timed
        t0 = time.perf_counter()
        self.engine.load_weights(state, version)
        return time.perf_counter() - t0


def make_prompts(tok: Any, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + " +-*=,."
    return [
        [tok.bos_token_id, *tok.encode("".join(rng.choices(chars, k=rng.randint(8, 32))), add_special_tokens=False)]
        for _ in range(n)
    ]


def throughput(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(vllm tokens/s, transformers tokens/s), medians over alternating calls."""
    path = str(materialize_preset(name, seed=0))
    hosts = {
        "vllm": Host.remote("vllm", path, args.threads),
        "transformers": Host.remote("transformers", path, args.threads),
    }
    prompts = [p for p in make_prompts(load_tokenizer(path), args.prompts) for _ in range(args.group)]
    expected = len(prompts) * args.new_tokens
    times: dict[str, list[float]] = {k: [] for k in hosts}
    for r in range(args.repeats + 1):
        for k in list(hosts)[:: 1 if r % 2 == 0 else -1]:
            params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=r, ignore_eos=True)
            seconds, tokens = ray.get(hosts[k].generate.remote(prompts, params))
            if tokens != expected:
                raise RuntimeError(f"{k} generated {tokens} tokens, expected {expected}")
            if r > 0:  # r == 0 is the warm-up
                times[k].append(seconds)
    for h in hosts.values():
        ray.kill(h)
    return expected / statistics.median(times["vllm"]), expected / statistics.median(times["transformers"])


def large_model_dir(layers: int, root: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = materialize_preset("tiny-qwen3-moe", seed=0)
    out = root / f"qwen3-moe-{layers}L-h512"
    config = AutoConfig.from_pretrained(
        path,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return out


def weight_update(path: Path, args: argparse.Namespace) -> None:
    model = load_model(path)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    ref = [ray.put(state)]
    clone_times = []
    for _ in range(4):  # the first pays the page faults of fresh memory, as the others pay none
        t0 = time.perf_counter()
        _ = {k: v.clone() for k, v in state.items()}
        clone_times.append(time.perf_counter() - t0)
    clone_s = statistics.median(clone_times[1:])
    variants = {
        "vllm in-process": ("vllm", True),
        "vllm subprocess": ("vllm", False),
        "transformers": ("transformers", True),
    }
    prompts = make_prompts(load_tokenizer(path), 4)
    model.load_state_dict(state)
    print(f"\n{path.name}: {nbytes / 2**20:.1f} MiB fp32; clone() {clone_s * 1e3:.1f} ms")
    print(f"{'engine':<18} {'update s':>9} {'GiB/s':>7} {'vs clone':>9} {'max |dlogp| vs new weights':>27}")
    for label, (kind, in_process) in variants.items():
        host = Host.remote(kind, str(path), args.threads, in_process)
        times = [ray.get(host.time_update.remote(ref, v)) for v in range(1, args.repeats + 2)][1:]
        outs = ray.get(host.greedy.remote(prompts))
        gap = max(
            float((torch.tensor(o.logprobs) - r).abs().max())
            for o, r in zip(
                outs,
                completion_logprobs(model, [o.prompt_ids for o in outs], [o.token_ids for o in outs], 0),
                strict=True,
            )
        )
        s = statistics.median(times)
        print(f"{label:<18} {s:>9.3f} {nbytes / s / 2**30:>7.2f} {s / clone_s:>8.1f}x {gap:>27.1e}")
        ray.kill(host)


def main() -> None:
    args = parse_args()
    logging.getLogger("vllm").setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}},
    )
    import vllm

    print(
        f"torch {torch.__version__}, vllm {vllm.__version__}, {args.threads} torch thread(s) per engine; "
        f"batch {args.prompts} prompts x {args.group} = {args.prompts * args.group} sequences x "
        f"{args.new_tokens} new tokens (eos ignored), temperature 1; median of {args.repeats}"
    )
    print(f"{'preset':<16} {'vllm tok/s':>11} {'transformers tok/s':>19} {'vllm speed-up':>14}")
    for name in args.presets:
        ours, hf = throughput(name, args)
        print(f"{name:<16} {ours:>11.0f} {hf:>19.0f} {ours / hf:>13.2f}x")
    weight_update(materialize_preset("tiny-qwen3-moe", seed=0), args)
    if not args.skip_large:
        with tempfile.TemporaryDirectory() as tmp:
            weight_update(large_model_dir(args.layers, Path(tmp)), args)
    ray.shutdown()


if __name__ == "__main__":
    main()
