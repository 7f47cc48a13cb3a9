"""LoRA on the policy (`model.lora`, tidal/model/lora.py) in the DeepSpeed trainer: the adapters on
attention and the experts' fused weights get the gradients peft gives in plain torch, the base stays
bit for bit what it was, and what leaves the trainer is the merged model under its Hugging Face names
(what peft's own merge gives)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tidal.config import LoRAConfig, TrainerConfig
from tidal.model.forward import forward
from tidal.model.loading import load_model, materialize_preset
from tidal.model.lora import apply_lora, base_name, is_adapter
from tidal.telemetry.metrics import values
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.losses_sft import next_token_nll, num_targets
from tidal.types import TokenBatch

pytestmark = pytest.mark.integration

CFG = TrainerConfig(lr=1e-2, eps=1e-6, max_grad_norm=100.0, micro_batch_size=2, grad_accum=2)
LORA = LoRAConfig(r=4, alpha=8.0)
# Largest relative error of an adapter's gradient against plain torch on the whole batch: the same
# bound as the full model's (test_trainer_deepspeed.GRAD_TOL), whose measured errors are ~1e-6.
GRAD_TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-glm5-moe"])
def preset(request: pytest.FixtureRequest) -> Path:
    return materialize_preset(request.param, seed=0)


def batch() -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 100, (4, 12), generator=g)
    loss_mask = torch.zeros(4, 12, dtype=torch.long)
    loss_mask[:, 4:] = 1
    return TokenBatch(ids, torch.ones(4, 12, dtype=torch.long), loss_mask)


def lora_model(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)  # peft draws lora_A at random: the same draw on both sides
    return apply_lora(load_model(path), LORA)


def with_b(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """lora_B is zero at first (so is the update, and lora_A's gradient): make it nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def plain_grads(path: Path, b: TokenBatch) -> dict[str, torch.Tensor]:
    model = with_b(lora_model(path), 1)
    logits, _ = forward(model, b.input_ids, b.attention_mask)
    loss = next_token_nll(logits, b.input_ids, b.loss_mask) / num_targets(b.loss_mask)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))


@pytest.mark.parametrize("stage", [0, 3])
def test_a_lora_step(preset: Path, stage: int) -> None:
    b = batch()
    ref = plain_grads(preset, b)
    model = with_b(lora_model(preset), 1)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters == {n for n, _ in model.named_parameters() if is_adapter(n)}
    assert any(".experts." in n for n in adapters) and any("self_attn" in n for n in adapters)
    base = load_model(preset).state_dict()

    trainer = DeepSpeedTrainer(model, CFG.model_copy(update={"zero_stage": stage}))
    grads: dict[str, torch.Tensor] = {}
    values(trainer.train_step(b, on_grads=grads.update))

    # Only the adapters have gradients, and they are plain torch's.
    assert set(grads) == adapters
    for name, g in grads.items():
        assert (g - ref[name]).norm() <= GRAD_TOL * ref[name].norm() + 1e-12, name
    # The base is untouched, bit for bit; the adapters moved.
    full = dict(trainer.iter_full_params())
    assert all(torch.equal(full[n], base[base_name(n)]) for n in full if not is_adapter(n))
    before = dict(with_b(lora_model(preset), 1).named_parameters())
    assert max((full[n] - before[n]).abs().max() for n in adapters) > 1e-3

    # The export is the merged model, named as Hugging Face names it: peft's own merge of the
    # trained adapters, and different from the base where an adapter sits.
    exported = trainer.state_dict_for_export()
    assert sorted(exported) == sorted(base)
    merged_ref = lora_model(preset)
    with torch.no_grad():
        for name, p in merged_ref.named_parameters():
            if is_adapter(name):
                p.copy_(full[name])
    merged = merged_ref.merge_and_unload().state_dict()
    for name, t in exported.items():
        torch.testing.assert_close(t, merged[name], atol=1e-6, rtol=1e-5)
    changed = {n for n in base if not torch.equal(exported[n], base[n])}
    assert any(".experts.gate_up_proj" in n for n in changed) and any("self_attn" in n for n in changed)
    assert all(("self_attn" in n or ".experts." in n) for n in changed), changed - {""}
