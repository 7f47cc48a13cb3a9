"""DeepSpeed trainer on CPU: one step takes the gradient plain torch takes on the whole batch, at
ZeRO 0-3, with gradient accumulation over micro-batches of unequal token counts and across two
ranks, and the optimizer applies it (clipped) as torch's AdamW would."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tidal.config import ScheduleConfig, TrainerConfig
from tidal.model.forward import forward
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.telemetry.metrics import values
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.losses_sft import next_token_nll, num_targets
from tidal.trainer.prepare import lr_factor
from tidal.types import TokenBatch

pytestmark = pytest.mark.integration

Grads = dict[str, torch.Tensor]

# (left padding, prompt length) per row: 9, 6, 5 and 3 target tokens, so micro-batches of two rows
# hold 15 and 8 targets and a per-micro-batch mean would weight them wrongly.
ROWS = [(0, 3), (4, 2), (2, 5), (6, 3)]
# eps well above the smallest gradients keeps Adam's first step from being sign(g) alone, so the
# update depends on the gradient's scale and shows whether it was clipped.
CFG = TrainerConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, max_grad_norm=1.0, micro_batch_size=2, grad_accum=2)

# Bounds, each measured on this model and batch on a 2-core AMD EPYC, and again with torch's CPU
# kernels limited to AVX2 or to none (ATEN_CPU_CAPABILITY), oneDNN to SSE4.1 or AVX2, MKL in its
# reproducible mode (MKL_CBWR=COMPATIBLE), and 1, 2 or 4 threads; the ranges below cover all of them.
#
# Largest per-parameter relative gradient error ||g_ds - g|| / ||g||: measured 1.1e-6 to 1.8e-6 (the
# worst is always a q/k-norm weight, whose gradient is ~1e-3 of the total), 1e-4 leaves a margin of
# 50. A per-micro-batch mean instead of the global token mean gives 0.40 (0.53 with one row per
# micro-batch over two ranks), a normaliser 10% off 0.09: three orders of magnitude above the bound.
GRAD_TOL = 1e-4
# Relative loss error: measured <= 6.7e-8, a margin of 150; a per-micro-batch mean changes the loss
# by 2.5e-3, 250 times the bound.
LOSS_TOL = 1e-5
# |theta_ds - AdamW's first step computed from the gradients DeepSpeed read|: the same gradient on
# both sides, so only elementwise rounding remains (an ulp or two, whatever the machine): measured
# <= 6e-8, one float32 step below the largest weight, 1.0; 1e-6 is 8 ulps of 1.0. Leaving out the
# clipping moves weights by 4.2e-4, 400 times the bound.
UPDATE_TOL = 1e-6
# bf16 against the fp32 reference, in units of bf16's unit roundoff u = 2^-8 = 3.9e-3 (8 significant
# bits). Relative loss error: measured <= 9.4e-5 = 0.02 u, bound u; a normaliser 10% off is 23 u.
# Relative gradient-norm error: measured <= 2.5e-3 = 0.6 u, bound 4 u, six times below a normaliser
# 10% off. Gradient direction: 1 - cos measured 3.2e-4 (an angle of 0.025 = 6.5 u, from rounding the
# weights and activations to bf16; the same under every kernel setting above), bound 2e-3 (an angle
# of 16 u); a per-micro-batch mean gives 0.047, 23 times the bound.
BF16_U = 2.0**-8
BF16_COS_TOL = 2e-3


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=0)


def make_batch(t: int = 12, seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 100, (len(ROWS), t), generator=g)
    attention = torch.ones(len(ROWS), t, dtype=torch.long)
    loss_mask = torch.zeros(len(ROWS), t, dtype=torch.long)
    for i, (pad, prompt) in enumerate(ROWS):
        attention[i, :pad] = 0
        loss_mask[i, pad + prompt :] = 1
    ids[attention == 0] = 0
    return TokenBatch(ids, attention, loss_mask)


@dataclass
class Reference:
    """Plain torch on the whole batch: the token-mean loss and its gradient, and the gradient a
    per-micro-batch mean (the mean over micro-batches of each one's token mean) would give."""

    loss: float
    grads: Grads
    per_micro_grads: Grads


def reference(path: Path, batch: TokenBatch, micro_batch_size: int) -> Reference:
    model = load_model(path)
    logits, _ = forward(model, batch.input_ids, batch.attention_mask)
    ids, mask = batch.input_ids, batch.loss_mask
    loss = next_token_nll(logits, ids, mask) / num_targets(mask)
    rows = [slice(i, i + micro_batch_size) for i in range(0, len(ids), micro_batch_size)]
    per_micro = sum(next_token_nll(logits[r], ids[r], mask[r]) / num_targets(mask[r]) for r in rows) / len(rows)
    return Reference(loss.item(), gradients(model, loss), gradients(model, per_micro))


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> Grads:
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(named.items(), grads, strict=True)}


def grad_norm(grads: Grads) -> float:
    return math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))


def grad_error(got: Grads, ref: Grads) -> float:
    """The largest per-parameter relative error ||got - ref|| / ||ref||."""
    assert got.keys() == ref.keys()
    return max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def adamw_first_step(init: dict[str, torch.Tensor], grads: Grads, cfg: TrainerConfig) -> dict[str, torch.Tensor]:
    """AdamW's first step by hand, on the gradients clipped as torch clips them.

    After one step m_hat = g and v_hat = g^2, so theta_1 = theta_0 (1 - lr wd) - lr g / (|g| + eps).
    """
    clip = 1.0 if cfg.max_grad_norm is None else min(1.0, cfg.max_grad_norm / (grad_norm(grads) + 1e-6))
    decay = 1 - cfg.lr * cfg.weight_decay
    return {k: init[k] * decay - cfg.lr * clip * g / (clip * g.abs() + cfg.eps) for k, g in grads.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def cosine(a: Grads, b: Grads) -> float:
    flat_a, flat_b = (torch.cat([g[k].double().flatten() for k in sorted(a)]) for g in (a, b))
    return torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0).item()


def check_step(
    metrics: dict[str, float],
    grads: Grads,
    params: dict[str, torch.Tensor],
    ref: Reference,
    init: dict[str, torch.Tensor],
    cfg: TrainerConfig,
) -> None:
    """The step's loss, gradient and update against plain torch on the whole batch."""
    assert metrics["tokens"] == 23
    assert metrics["loss"] == pytest.approx(ref.loss, rel=LOSS_TOL)
    assert metrics["grad_norm"] == pytest.approx(grad_norm(ref.grads), rel=GRAD_TOL)  # before clipping
    assert grad_error(grads, ref.grads) < GRAD_TOL
    assert grad_error(grads, ref.per_micro_grads) > 1000 * GRAD_TOL  # a wrong normaliser fails widely
    assert max_diff(params, adamw_first_step(init, grads, cfg)) < UPDATE_TOL
    assert max_diff(params, init) > 5e-4  # the step moved the weights, by about lr


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_step_matches_plain_torch(preset: Path, stage: int) -> None:
    batch = make_batch()
    ref = reference(preset, batch, CFG.micro_batch_size)
    init = load_model(preset).state_dict()
    cfg = CFG.model_copy(update={"zero_stage": stage})
    trainer = DeepSpeedTrainer(load_model(preset), cfg)

    grads: Grads = {}
    metrics = values(trainer.train_step(batch, on_grads=grads.update))

    assert trainer.version == 1 and metrics["micro_batches"] == 2
    assert grad_norm(ref.grads) > CFG.max_grad_norm  # so clipping is exercised
    check_step(metrics, grads, trainer.state_dict_for_export(), ref, init, cfg)


def test_a_packed_step_matches_plain_torch(preset: Path) -> None:
    """`trainer.packing` (left-padded rows here): each micro-batch's rows as one sequence of their
    tokens under a budget of 24, the same SFT step as plain torch on the padded batch."""
    batch = make_batch()
    ref = reference(preset, batch, CFG.micro_batch_size)
    init = load_model(preset).state_dict()
    cfg = CFG.model_copy(update={"max_tokens_per_micro_batch": 24, "packing": True})
    trainer = DeepSpeedTrainer(load_model(preset), cfg)

    grads: Grads = {}
    metrics = values(trainer.train_step(batch, on_grads=grads.update))

    assert all(m.packed for m in trainer.micros)
    check_step(metrics, grads, trainer.state_dict_for_export(), ref, init, cfg)


@pytest.mark.parametrize("stage", [0, 2])
def test_unclipped_step_matches_plain_torch(preset: Path, stage: int) -> None:
    """Without clipping: the norm comes from the trainer's own hook at ZeRO 0, from DeepSpeed's at 2."""
    cfg = CFG.model_copy(update={"max_grad_norm": None, "eps": 1e-3, "zero_stage": stage})
    batch = make_batch()
    ref = reference(preset, batch, cfg.micro_batch_size)
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), cfg)

    grads: Grads = {}
    metrics = values(trainer.train_step(batch, on_grads=grads.update))

    check_step(metrics, grads, trainer.state_dict_for_export(), ref, init, cfg)
    assert grad_error(grads, {k: g / 1.1 for k, g in ref.grads.items()}) > 100 * GRAD_TOL  # a normaliser 10% off


def _two_rank_worker(rank: int, port: int, path: str, out_dir: str, stages: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    full = make_batch()
    half = TokenBatch(*(t[2 * rank : 2 * rank + 2] for t in (full.input_ids, full.attention_mask, full.loss_mask)))
    for stage in stages:
        # One row per micro-batch: rank 0 sees 9 + 6 targets, rank 1 sees 5 + 3.
        cfg = CFG.model_copy(update={"zero_stage": stage, "micro_batch_size": 1})
        trainer = DeepSpeedTrainer(load_model(path), cfg)
        grads: Grads = {}  # all-reduced over both ranks: every rank reads the whole gradient
        metrics = values(trainer.train_step(half, on_grads=grads.update))
        params = trainer.state_dict_for_export()
        if rank == 0:
            torch.save({"metrics": metrics, "grads": grads, "params": params}, Path(out_dir) / f"stage{stage}.pt")
    # Leave together: a rank that exits while its peer still holds gloo connections can abort the
    # peer at interpreter shutdown ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_match_plain_torch_full_batch(preset: Path, tmp_path: Path) -> None:
    from tidal.trainer.prepare import free_port

    stages = [0, 2, 3]
    mp.spawn(_two_rank_worker, args=(free_port(), str(preset), str(tmp_path), stages), nprocs=2, join=True)
    # The wrong normaliser to rule out: the mean of the four one-row micro-batches' token means.
    ref = reference(preset, make_batch(), micro_batch_size=1)
    init = load_model(preset).state_dict()
    for stage in stages:
        out = torch.load(tmp_path / f"stage{stage}.pt")
        cfg = CFG.model_copy(update={"zero_stage": stage})
        check_step(out["metrics"], out["grads"], out["params"], ref, init, cfg)


@pytest.mark.parametrize(("stage", "params"), [(2, False), (3, True)])
def test_an_offloaded_optimizer_takes_the_same_step(preset: Path, stage: int, params: bool) -> None:
    """`trainer.offload_optimizer` (and at ZeRO-3 `offload_params`): the masters and moments in host
    memory, stepped there by the same torch AdamW; the step is the one plain torch takes."""
    batch = make_batch()
    ref = reference(preset, batch, CFG.micro_batch_size)
    init = load_model(preset).state_dict()
    cfg = CFG.model_copy(update={"zero_stage": stage, "offload_optimizer": True, "offload_params": params})
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    assert trainer.engine.zero_offload_optimizer() is not None  # DeepSpeed's offload config, when on
    assert (trainer.engine.zero_offload_param() is not None) == params

    grads: Grads = {}
    metrics = values(trainer.train_step(batch, on_grads=grads.update))
    check_step(metrics, grads, trainer.state_dict_for_export(), ref, init, cfg)


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_step_follows_fp32(preset: Path, stage: int) -> None:
    batch = make_batch()
    ref = reference(preset, batch, CFG.micro_batch_size)
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), CFG.model_copy(update={"zero_stage": stage, "precision": "bf16"}))
    assert next(trainer.module.parameters()).dtype == torch.bfloat16

    grads: Grads = {}
    metrics = values(trainer.train_step(batch, on_grads=grads.update))
    params = trainer.state_dict_for_export()

    assert metrics["loss"] == pytest.approx(ref.loss, rel=BF16_U)
    assert metrics["grad_norm"] == pytest.approx(grad_norm(ref.grads), rel=4 * BF16_U)
    assert 1 - cosine(grads, ref.grads) < BF16_COS_TOL
    assert 1 - cosine(grads, ref.per_micro_grads) > 10 * BF16_COS_TOL  # a wrong normaliser fails widely
    assert all(v.dtype == torch.float32 for v in params.values())  # the fp32 master weights
    assert max_diff(params, init) > 5e-4  # the step moved the weights, by about lr


@pytest.mark.parametrize("stage", [0, 3])
def test_lr_schedule_and_version(preset: Path, stage: int) -> None:
    schedule = ScheduleConfig(type="cosine", warmup_steps=2, total_steps=5, min_lr_ratio=0.1)
    # No weight decay: it would add lr * 0.1 on the norm weights (which start at 1).
    cfg = CFG.model_copy(update={"schedule": schedule, "zero_stage": stage, "weight_decay": 0.0})
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    lrs = [values(trainer.train_step(make_batch(seed=0)))["lr"]]
    # Adam's first step moves a weight by at most the lr in force, nearly that for most weights:
    # the optimizer (inside the ZeRO wrapper) really uses the scheduled lr, not the peak.
    first_move = max_diff(trainer.state_dict_for_export(), init)
    assert first_move == pytest.approx(1e-3 / 3, rel=0.02)
    lrs += [values(trainer.train_step(make_batch(seed=s)))["lr"] for s in range(1, 5)]
    assert lrs == pytest.approx([cfg.lr * lr_factor(s, schedule, 5) for s in range(5)])
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.55e-3, 0.1e-3])
    assert trainer.version == 5


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")])
def test_save_hf_round_trip(preset: Path, tmp_path: Path, stage: int, precision: str) -> None:
    cfg = CFG.model_copy(update={"zero_stage": stage, "precision": precision})
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    trainer.train_step(make_batch())
    exported = trainer.state_dict_for_export()

    # Shards of at most 256 kB (of a 7 MB model): written one gathered tensor at a time, with their index.
    out = trainer.save_hf(tmp_path / "ckpt", load_tokenizer(preset), shard_bytes=2**18)
    loaded = load_model(out)

    err = max_diff(loaded.state_dict(), exported)
    assert err == 0.0
    assert load_tokenizer(out).get_vocab() == load_tokenizer(preset).get_vocab()
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 5 and set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:  # each within the bound, or one tensor larger than it alone
        tensors = load_file(f)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 2**18 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    # In the model's dtype (what a bf16 run's final checkpoint holds): the masters rounded.
    half = trainer.save_hf(tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    written = load_file(half / "model.safetensors")  # one shard: named as transformers names it
    assert written.keys() == exported.keys()
    assert all(torch.equal(written[k], v.to(torch.bfloat16)) for k, v in exported.items())
    # The engine's own (possibly partitioned, possibly bf16) weights are the rounded masters.
    import deepspeed

    engine_params = dict(trainer.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(engine_params.values()), enabled=stage == 3):
        for name, p in engine_params.items():
            assert torch.equal(loaded.get_parameter(name).to(p.dtype), p.detach()), name
    # What a bf16 publish sends: each master cast where it was gathered, the same values as the
    # fp32 export rounded, every entry in bf16.
    published = dict(trainer.iter_export(torch.bfloat16))
    assert published.keys() == exported.keys()
    assert all(t.dtype == torch.bfloat16 for t in published.values())
    assert all(torch.equal(published[k], v.to(torch.bfloat16)) for k, v in exported.items())


# ------------------------------------------------------------------ MoE under ZeRO-3, disjoint experts

RANK_EXPERTS = {0: [0, 1], 1: [2, 3]}  # every token of rank r goes to these experts, in every layer


def _pin_routing(model: torch.nn.Module, experts: list[int]) -> None:
    """Route every token to `experts` (a forward hook on each real router): the two ranks then run
    disjoint experts, the case that hangs ZeRO-3 when each rank gathers only the experts it runs."""

    def hook(_module: torch.nn.Module, _inputs: tuple, out: tuple) -> tuple:
        logits, scores, indices = out
        return logits, scores, torch.tensor(experts).expand_as(indices)

    for block in (m for m in model.modules() if hasattr(m, "experts")):
        block.gate.register_forward_hook(hook)


def _disjoint_worker(rank: int, port: int, path: str, out_dir: str) -> None:
    from deepspeed.utils import get_z3_leaf_modules

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    full = make_batch()
    half = TokenBatch(*(t[2 * rank : 2 * rank + 2] for t in (full.input_ids, full.attention_mask, full.loss_mask)))
    model = load_model(path)
    _pin_routing(model, RANK_EXPERTS[rank])
    trainer = DeepSpeedTrainer(
        model, CFG.model_copy(update={"zero_stage": 3, "micro_batch_size": 1, "weight_decay": 0.0})
    )
    leaves = sorted({type(m).__name__ for m in get_z3_leaf_modules(trainer.module)})
    for _ in range(2):
        trainer.train_step(half)
    params = trainer.state_dict_for_export()
    if rank == 0:
        torch.save({"leaves": leaves, "params": params}, Path(out_dir) / "disjoint.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("name, block", [("tiny-qwen3-moe", "Qwen3MoeSparseMoeBlock"), ("tiny-glm4-moe", "Glm4MoeMoE")])
def test_zero3_moe_with_disjoint_experts_per_rank_finishes(preset: Path, tmp_path: Path, name: str, block: str) -> None:
    # DeepSpeed itself registers Qwen3's block as a leaf (its default list); GLM's only tidal does.
    from tidal.trainer.prepare import free_port

    path = materialize_preset(name, seed=0)
    ctx = mp.start_processes(
        _disjoint_worker, args=(free_port(), str(path), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300  # a hang fails the test instead of stalling CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two ZeRO-3 ranks routing to disjoint experts did not finish a step in 300 s")
    out = torch.load(tmp_path / "disjoint.pt")
    assert out["leaves"] == [block]
    init = load_model(path).state_dict()
    checked = 0
    for key, value in out["params"].items():
        if not key.endswith("experts.gate_up_proj"):
            continue
        checked += 1
        moved = [not torch.equal(value[e], init[key][e]) for e in range(value.shape[0])]
        # Each rank's experts learn from that rank's tokens (gradients summed over both ranks); the
        # experts no token was routed to get zero gradient, and Adam with no weight decay leaves them.
        assert moved == [e in RANK_EXPERTS[0] + RANK_EXPERTS[1] for e in range(value.shape[0])], key
    assert checked >= 3  # every MoE layer (GLM's first layer is dense)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero3_loads_each_rank_its_partition(preset: Path, stage: int) -> None:
    """At ZeRO-3 the checkpoint is loaded under deepspeed.zero.Init: every parameter arrives already
    partitioned (DeepSpeed's attributes set before the engine exists), with the checkpoint's values;
    below ZeRO-3 the model loads whole."""
    import deepspeed

    from tidal.trainer.prepare import load_for_training

    model = load_for_training(preset, TrainerConfig(zero_stage=stage, lr=1e-3))
    params = dict(model.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values()) == (stage == 3)
    plain = load_model(preset).state_dict()
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        assert max((p - plain[n]).abs().max().item() for n, p in params.items()) == 0.0
    # The config that partitioned this load is gone: a reference model loaded next is whole.
    assert not any(hasattr(p, "ds_id") for p in load_model(preset).parameters())
