"""DeepSpeed trainer on CPU: one step equals the plain-torch step on the whole batch, at ZeRO 0-3,
with gradient accumulation over micro-batches of unequal token counts and across two ranks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tidal.config import ScheduleConfig, TrainerConfig
from tidal.models import load_model, load_tokenizer, materialize_preset
from tidal.trainer.engine import DeepSpeedTrainer, lr_factor
from tidal.trainer.losses_sft import forward_logits, next_token_nll
from tidal.types import TokenBatch

pytestmark = pytest.mark.integration

# (left padding, prompt length) per row: 9, 6, 5 and 3 target tokens, so micro-batches of two rows
# hold 15 and 8 targets and a per-micro-batch mean would weight them wrongly.
ROWS = [(0, 3), (4, 2), (2, 5), (6, 3)]
# eps well above the smallest gradients keeps Adam's first step from being sign(g) alone, so the
# update depends on the gradient's scale and a wrong normalisation shows in the parameters.
CFG = TrainerConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, max_grad_norm=1.0, micro_batch_size=2, grad_accum=2)
# Adam's first step is lr * g / (|g| + eps): where |g| ~ eps it magnifies gradient rounding, which
# depends on the summation order of the CPU's kernels. Measured: up to 2.6e-6 between DeepSpeed and
# plain torch on a 2-core x86 machine; a per-micro-batch mean instead of the global token mean moves
# the weights by 2e-3, so the bound below still tells a wrong normalisation by two orders of magnitude.
TOL = 1e-5


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("TIDAL_CACHE", str(tmp_path_factory.mktemp("cache")))
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


def plain_torch_step(path: Path, batch: TokenBatch, cfg: TrainerConfig) -> tuple[dict, float, float]:
    """The reference: AdamW on the whole batch with the token-mean loss, torch's own clipping."""
    model = load_model(path)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)
    loss = next_token_nll(logits, batch.input_ids, batch.loss_mask) / batch.loss_mask[:, 1:].sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss.item(), norm.item()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_step_matches_plain_torch(preset: Path, stage: int) -> None:
    batch = make_batch()
    ref, ref_loss, ref_norm = plain_torch_step(preset, batch, CFG)
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), CFG.model_copy(update={"zero_stage": stage}))

    metrics = trainer.train_step(batch)
    params = trainer.state_dict_for_export()

    assert trainer.version == 1
    assert metrics["tokens"] == 23 and metrics["micro_batches"] == 2
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert ref_norm > CFG.max_grad_norm  # so clipping is exercised
    moved, err = max_diff(params, init), max_diff(params, ref)
    assert moved > 5e-4  # the step moved the weights by about lr
    assert err < TOL


def test_unclipped_step_depends_on_gradient_scale(preset: Path) -> None:
    """Without clipping the update scales with the gradient (eps), so normalisation is visible."""
    cfg = CFG.model_copy(update={"max_grad_norm": None, "eps": 1e-3, "zero_stage": 2})
    batch = make_batch()
    ref, _, ref_norm = plain_torch_step(preset, batch, cfg)
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    metrics = trainer.train_step(batch)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    err = max_diff(trainer.state_dict_for_export(), ref)
    assert err < TOL


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
        metrics = trainer.train_step(half)
        params = trainer.state_dict_for_export()
        if rank == 0:
            torch.save({"metrics": metrics, "params": params}, Path(out_dir) / f"stage{stage}.pt")
    # Leave together: a rank that exits while its peer still holds gloo connections can abort the
    # peer at interpreter shutdown ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_match_plain_torch_full_batch(preset: Path, tmp_path: Path) -> None:
    from tidal.trainer.engine import _free_port

    stages = [0, 2, 3]
    mp.spawn(_two_rank_worker, args=(_free_port(), str(preset), str(tmp_path), stages), nprocs=2, join=True)
    ref, ref_loss, ref_norm = plain_torch_step(preset, make_batch(), CFG)
    for stage in stages:
        out = torch.load(tmp_path / f"stage{stage}.pt")
        assert out["metrics"]["tokens"] == 23, stage
        assert out["metrics"]["loss"] == pytest.approx(ref_loss, rel=1e-5), stage
        assert out["metrics"]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5), stage
        err = max_diff(out["params"], ref)
        assert err < TOL, stage


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_step_runs_and_follows_fp32(preset: Path, stage: int) -> None:
    batch = make_batch()
    ref, _, _ = plain_torch_step(preset, batch, CFG)
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), CFG.model_copy(update={"zero_stage": stage, "precision": "bf16"}))
    assert next(trainer.module.parameters()).dtype == torch.bfloat16

    metrics = trainer.train_step(batch)
    params = trainer.state_dict_for_export()

    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert metrics["loss"] == pytest.approx(4.65, abs=0.1)  # ln(vocab) at init, as in fp32
    assert all(v.dtype == torch.float32 for v in params.values())  # the fp32 master weights
    delta = torch.cat([(params[k] - init[k]).flatten() for k in init])
    ref_delta = torch.cat([(ref[k] - init[k]).flatten() for k in init])
    assert delta.abs().max() > 5e-4
    assert torch.nn.functional.cosine_similarity(delta, ref_delta, dim=0) > 0.9


@pytest.mark.parametrize("stage", [0, 3])
def test_lr_schedule_and_version(preset: Path, stage: int) -> None:
    schedule = ScheduleConfig(type="cosine", warmup_steps=2, total_steps=5, min_lr_ratio=0.1)
    # No weight decay: it would add lr * 0.1 on the norm weights (which start at 1).
    cfg = CFG.model_copy(update={"schedule": schedule, "zero_stage": stage, "weight_decay": 0.0})
    init = load_model(preset).state_dict()
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    lrs = [trainer.train_step(make_batch(seed=0))["lr"]]
    # Adam's first step moves a weight by at most the lr in force, nearly that for most weights:
    # the optimizer (inside the ZeRO wrapper) really uses the scheduled lr, not the peak.
    first_move = max_diff(trainer.state_dict_for_export(), init)
    assert first_move == pytest.approx(1e-3 / 3, rel=0.02)
    lrs += [trainer.train_step(make_batch(seed=s))["lr"] for s in range(1, 5)]
    assert lrs == pytest.approx([cfg.lr * lr_factor(s, schedule, 5) for s in range(5)])
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.55e-3, 0.1e-3])
    assert trainer.version == 5


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")])
def test_save_hf_round_trip(preset: Path, tmp_path: Path, stage: int, precision: str) -> None:
    cfg = CFG.model_copy(update={"zero_stage": stage, "precision": precision})
    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    trainer.train_step(make_batch())
    exported = trainer.state_dict_for_export()

    out = trainer.save_hf(tmp_path / "ckpt", load_tokenizer(preset))
    loaded = load_model(out)

    err = max_diff(loaded.state_dict(), exported)
    assert err == 0.0
    assert load_tokenizer(out).get_vocab() == load_tokenizer(preset).get_vocab()
    # The engine's own (possibly partitioned, possibly bf16) weights are the rounded masters.
    import deepspeed

    engine_params = dict(trainer.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(engine_params.values()), enabled=stage == 3):
        for name, p in engine_params.items():
            assert torch.equal(loaded.get_parameter(name).to(p.dtype), p.detach()), name
