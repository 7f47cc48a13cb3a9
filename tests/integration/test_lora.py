"""LoRA on the policy (`model.lora`, tidal/model/lora.py) in the DeepSpeed trainer: the adapters on
attention and the experts' fused weights get the gradients peft gives in plain torch, the base stays
bit for bit what it was, and what leaves the trainer is the merged model under its Hugging Face names
(what peft's own merge gives)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from tidal.config import LoRAConfig, TrainerConfig, WeightSyncConfig
from tidal.model.forward import completion_logprobs, forward
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.model.lora import apply_lora, base_name, is_adapter
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.telemetry.metrics import values
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.losses_sft import next_token_nll, num_targets
from tidal.types import SamplingParams, TokenBatch
from tidal.weight_sync import buckets, make_publisher, make_receiver, sync_group_address

pytestmark = pytest.mark.integration

CFG = TrainerConfig(lr=1e-2, eps=1e-6, max_grad_norm=100.0, micro_batch_size=2, grad_accum=2)
LORA = LoRAConfig(r=4, alpha=8.0)
# Largest relative error of an adapter's gradient against plain torch on the whole batch: the same
# bound as the full model's (test_trainer_deepspeed.GRAD_TOL), whose measured errors are ~1e-6.
GRAD_TOL = 1e-4


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-glm5-moe"])
def preset(request: pytest.FixtureRequest) -> Path:
    return materialize_preset(request.param, seed=0)


def batch(seed: int = 0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
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


# --------------------------------------------------------------------------------- adapter-only sync

TRANSPORTS = {
    "object_store": {"type": "object_store"},
    "broadcast": {"type": "broadcast", "backend": "gloo", "timeout_s": 30},
    "disk": {"type": "disk", "keep": 2},
}


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init()  # the session's runtime (tests/conftest.py); the object store transport needs it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def trained() -> tuple[Path, DeepSpeedTrainer]:
    """A LoRA trainer on the Qwen3-MoE preset after two steps (so both A and B have moved)."""
    path = materialize_preset("tiny-qwen3-moe", seed=0)
    trainer = DeepSpeedTrainer(lora_model(path), CFG)
    for _ in range(2):
        trainer.train_step(batch())
    return path, trainer


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_adapters_alone_reach_the_engine(
    ray_session: None, trained: tuple[Path, DeepSpeedTrainer], transport: str, tmp_path: Path
) -> None:
    """A publish of the adapters alone (`model.lora.publish: adapters`) crosses every transport bit
    for bit, is a small part of the model's bytes, and the transformers engine running those
    adapters over its own base generates what the merged model would (its log-probs, to the engine
    tests' tolerance)."""
    path, trainer = trained
    cfg = WeightSyncConfig.model_validate({"transport": TRANSPORTS[transport]})
    if transport == "broadcast":
        address, port = sync_group_address()
        group = (address, port, 2)
        box: dict[str, Any] = {}
        joining = threading.Thread(target=lambda: box.setdefault("r", make_receiver(cfg, group, 1)))
        joining.start()
        publisher = make_publisher(cfg, tmp_path, group)
        joining.join(timeout=60)
        receiver = box["r"]
    else:
        publisher, receiver = make_publisher(cfg, tmp_path), make_receiver(cfg)
    adapters = dict(trainer.iter_adapters())
    handle = publisher.publish(buckets(adapters.items(), 10_000), version=2)
    model_bytes = sum(t.numel() * t.element_size() for t in trainer.state_dict_for_export().values())
    assert handle.nbytes == sum(t.numel() * t.element_size() for t in adapters.values()) < model_bytes / 5

    torch.manual_seed(1)  # the engine's own adapters start elsewhere: only the publish makes them equal
    engine = TransformersEngine(apply_lora(load_model(path), LORA), load_tokenizer(path))
    assert engine.weight_names() == set(adapters)
    engine.load_weights(receiver.receive_buckets(handle), 2)
    held = engine.model.state_dict()
    assert all(torch.equal(held[n], t) for n, t in adapters.items())

    prompts = [[7, 12, 30, 9], [40, 41, 42]]
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, seed=0, ignore_eos=True))
    merged = load_model(path)
    merged.load_state_dict(trainer.state_dict_for_export())
    forward = completion_logprobs(merged, [c.prompt_ids for c in out], [c.token_ids for c in out], 0, 1.0)
    for c, f in zip(out, forward, strict=True):
        assert c.version == 2
        torch.testing.assert_close(torch.tensor(c.logprobs), f, atol=1e-4, rtol=0)
    publisher.close()
    receiver.close()


def test_the_kl_reference_under_lora_is_the_base_with_adapters_off() -> None:
    """With LoRA and the KL penalty on, the trainer holds no second copy of the model: the reference's
    log-probs are its own frozen base's, adapters switched off (peft's `disable_adapter`), equal to a
    freshly loaded base's, while the same module with its adapters on gives other log-probs."""
    from tidal.config import load_config
    from tidal.model.forward import batch_logprobs
    from tidal.trainer.actor import TrainerActor, TrainerActorConfig

    path = materialize_preset("tiny-qwen3-moe", seed=0)
    threads = torch.get_num_threads()
    cfg = load_config(None, ["model.lora={r: 4}", "algorithm.loss.kl.coef=0.01", "monitor.wandb=disabled"]).for_rl()
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(path))
    torch.set_num_threads(threads)
    assert actor.ref is None
    policy = with_b(actor.trainer.module, 1)  # adapters that change the model
    b = batch(0)
    reference = actor._logprobs(policy, b, adapters_off=True)
    base = batch_logprobs(load_model(path).eval(), b, temperature=cfg.rollout.temperature, micro_batch_size=4)
    adapted = actor._logprobs(policy, b)
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-2


# ------------------------------------------------------------------------------- resume, save, config


def test_resume_is_exact_and_the_adapter_loads_with_peft(tmp_path: Path) -> None:
    """A LoRA run's DeepSpeed checkpoint (ZeRO-3) continues bit for bit; the adapter saved in peft's
    format loads with `PeftModel.from_pretrained` into the model the trainer holds."""
    from peft import PeftModel

    from tidal.model.lora import save_adapter

    path = materialize_preset("tiny-qwen3-moe", seed=0)
    cfg = CFG.model_copy(update={"zero_stage": 3})
    first = DeepSpeedTrainer(lora_model(path), cfg)
    first.train_step(batch(0))
    first.engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    first.train_step(batch(1))
    expected = dict(first.iter_adapters())

    second = DeepSpeedTrainer(lora_model(path), cfg)
    second.engine.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    second.train_step(batch(1))
    got = dict(second.iter_adapters())
    assert all(torch.equal(got[n], t) for n, t in expected.items())

    save_adapter(tmp_path / "adapter", got, LORA, str(path))
    loaded = PeftModel.from_pretrained(load_model(path), str(tmp_path / "adapter"))
    held = dict(loaded.named_parameters())
    assert all(torch.equal(held[n], t) for n, t in got.items())
    merged = loaded.merge_and_unload().state_dict()
    exported = second.state_dict_for_export()
    assert all(torch.allclose(merged[n], t, atol=1e-6) for n, t in exported.items())


def test_lora_config_errors_are_one_line() -> None:
    from tidal.config import ConfigError, load_config
    from tidal.model.lora import adapter_names

    with pytest.raises(ConfigError, match="needs GPU workers"):
        load_config(None, ["rollout.engine=vllm", "model.lora={r: 8}"])
    load_config(None, ["rollout.engine=vllm", "model.lora={r: 8, publish: merged}"])  # vLLM on CPU: merged
    with pytest.raises(ConfigError, match="dropout must be 0"):
        load_config(None, ["model.lora={dropout: 0.05}"])
    with pytest.raises(ConfigError, match="router"):
        load_config(None, ["model.lora={target_modules: [q_proj, gate]}"])
    path = materialize_preset("tiny-glm4-moe", seed=0)
    with pytest.raises(ValueError, match="match no layer; the policy has"):
        apply_lora(load_model(path), LoRAConfig(target_modules=["nope"], experts=False))
    # What vLLM expects of a snapshot, from the config alone, is what peft gives the model.
    from transformers import AutoConfig

    lora = LoRAConfig(r=4)
    real = {n for n, _ in apply_lora(load_model(path), lora).named_parameters() if is_adapter(n)}
    assert adapter_names(AutoConfig.from_pretrained(path), lora) == real
