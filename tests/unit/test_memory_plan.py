"""The memory plan (`tidal plan`): parameters counted as the model has them, activations as autograd
keeps them, DeepSpeed's partition rules, and a refusal in one line when a run cannot fit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tidal.cli import main
from tidal.config import EXPERT_PARAMETERS, ConfigError, LoRAConfig, RunConfig, load_config
from tidal.model.forward import forward_hidden
from tidal.model.loading import build_char_tokenizer, load_model, materialize_preset, preset_config
from tidal.model.lora import apply_lora, is_adapter
from tidal.model.memory import GB, Adapters, Architecture, Plan, layer_activation_elements, plan_memory
from tidal.stages.plan import describe

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
QWEN3_30B = REPO / "configs" / "gpu" / "models" / "qwen3-30b-a3b"
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module", params=["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"])
def preset(request: pytest.FixtureRequest) -> tuple[str, AutoModelForCausalLM]:
    torch.manual_seed(0)
    return request.param, AutoModelForCausalLM.from_config(preset_config(request.param, build_char_tokenizer()))


def test_parameters_are_counted_as_the_model_holds_them(preset: tuple[str, torch.nn.Module]) -> None:
    _, model = preset
    assert Architecture.of(model.config).params == sum(p.numel() for p in model.parameters())


def saved_per_token_layer(model: torch.nn.Module, tokens: int) -> float:
    """Elements autograd keeps for the backward of a forward, per token and decoder layer (each
    storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes() // t.element_size()
        return t

    ids = torch.randint(5, model.config.vocab_size, (2, tokens // 2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_hidden(model, ids, torch.ones_like(ids))
    return total[0] / tokens / model.config.num_hidden_layers


def test_activations_are_what_autograd_keeps(preset: tuple[str, torch.nn.Module]) -> None:
    """The per-layer count against autograd's saved tensors on the presets (each layer's share of a
    whole forward, the embedding's and the final norm's included): within 12%. GLM-5's sparse
    attention indexer keeps scores quadratic in the length, which the count leaves out: checked at
    a short length, where they are small."""
    name, model = preset
    arch = Architecture.of(model.config)
    moe_layers = arch.layers - arch.dense_layers
    planned = (
        moe_layers * layer_activation_elements(arch) + arch.dense_layers * layer_activation_elements(arch, moe=False)
    ) / arch.layers
    tokens = 64 if name == "tiny-glm5-moe" else 256
    measured = saved_per_token_layer(model, tokens)
    assert planned == pytest.approx(measured, rel=0.12), (planned, measured)


def test_deepspeed_partitions_and_offload(tmp_path: Path) -> None:
    """ZeRO's 16 bytes per parameter in bf16 (2 weights, 2 gradients, 12 optimizer: fp32 master and
    two moments), each state split from its stage on; offload moves the optimizer to the host;
    activation checkpointing keeps a layer's input per token; a token budget sets the tokens."""
    arch = Architecture.of(AutoConfig.from_pretrained(QWEN3_30B))
    assert arch.params == pytest.approx(30.5e9, rel=0.01) and (arch.experts, arch.top_k) == (128, 8)
    p = arch.params

    def plan(*overrides: str):
        base = ["trainer.precision=bf16", "trainer.num_ranks=8", "trainer.num_gpus=1", "model.dtype=bfloat16"]
        return plan_memory(load_config(None, [*base, *overrides]).for_rl(), arch, prompt_tokens=1024)

    stage = {s: plan(f"trainer.zero_stage={s}").trainer for s in (0, 1, 2, 3)}
    assert [stage[s]["weights"] for s in (0, 1, 2, 3)] == [2 * p] * 3 + [2 * p // 8]
    assert [stage[s]["optimizer states"] for s in (0, 1, 2, 3)] == [12 * p] + [12 * p // 8] * 3
    assert stage[3]["gradients"] == 2 * p // 8 and stage[0]["gradients"] == 2 * p
    zero3 = stage[3]
    assert zero3["weights"] + zero3["gradients"] + zero3["optimizer states"] == pytest.approx(16 * p / 8, rel=1e-6)

    offloaded = plan("trainer.zero_stage=3", "trainer.offload_optimizer=true")
    assert offloaded.trainer["optimizer states"] == 0
    assert offloaded.host["trainer optimizer states (offloaded)"] == 12 * p // 8 * 8  # 8 ranks on the node

    plain = plan("trainer.zero_stage=3", "trainer.micro_batch_size=2", "rollout.max_new_tokens=3072")
    assert plain.micro_tokens == 2 * (1024 + 3072)
    budget = plan("trainer.zero_stage=3", "trainer.max_tokens_per_micro_batch=16384", "rollout.max_new_tokens=3072")
    assert budget.micro_tokens == 16384
    ckpt = plan(
        "trainer.zero_stage=3",
        "trainer.micro_batch_size=2",
        "rollout.max_new_tokens=3072",
        "trainer.activation_checkpointing=true",
    )
    layer = plain.micro_tokens * layer_activation_elements(arch) * 2
    assert ckpt.trainer["activations"] == plain.micro_tokens * arch.layers * arch.hidden * 2  # layer inputs
    assert (ckpt.trainer["backward working set"], plain.trainer["backward working set"]) == (2 * layer, layer)
    assert ckpt.trainer["activations"] < plain.trainer["activations"] / 20
    # A rank's peak is the larger phase: the backward (activations) or the optimizer step.
    assert plain.trainer_total == plain.trainer_backward > plain.trainer_step
    kl = plan("trainer.zero_stage=3", "algorithm.loss.kl.coef=0.01")
    assert kl.trainer["KL reference"] == 2 * p // 8
    # Packed micro-batches: sdpa keeps the rows apart with a (tokens x tokens) boolean mask; flash
    # attention's varlen kernel needs none.
    packed = plan("trainer.zero_stage=3", "trainer.max_tokens_per_micro_batch=16384", "trainer.packing=true")
    assert packed.trainer["packed attention mask"] == 16384**2
    assert packed.trainer_backward == budget.trainer_backward + 16384**2
    flash = plan(
        "trainer.zero_stage=3",
        "trainer.max_tokens_per_micro_batch=16384",
        "trainer.packing=true",
        "model.attn_implementation=flash_attention_2",
    )
    assert "packed attention mask" not in flash.trainer
    # vLLM at TP 2 reads each update from /dev/shm two buckets at a time, not as a whole snapshot.
    tp2 = plan(
        "rollout.engine=vllm",
        "rollout.vllm.tensor_parallel_size=2",
        "rollout.num_gpus_per_worker=2",
        "weight_sync.bucket_mb=512",
    )
    assert tp2.host["/dev/shm snapshot parts (TP > 1)"] == 2 * 512 * 2**20  # one worker


def test_a_run_that_cannot_fit_this_node_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Qwen3-30B-A3B trained on this machine's CPUs: `tidal plan` prints every part, then the one line
    `tidal train` (and `tidal check`) refuses it with, naming the levers."""
    model = tmp_path / "model"
    shutil.copytree(QWEN3_30B, model)
    build_char_tokenizer().save_pretrained(model)
    args = [f"model.path={model}", "model.sft_warm_start=null", f"output_dir={tmp_path / 'runs'}"]
    assert main(["plan", QUICKSTART, *args]) == 2
    out, err = capsys.readouterr()
    assert "policy: 30.5B parameters (48 layers, 128 experts, top-8" in out
    assert "optimizer states" in out and "activations" in out and "KV cache" in out
    (line,) = err.strip().splitlines()
    assert line.startswith("tidal: error: the memory plan needs") and "of host memory per node" in line
    assert "trainer.offload_optimizer=true" in line and "trainer.activation_checkpointing=true" in line
    assert main(["check", QUICKSTART, *args]) == 2
    assert capsys.readouterr().err.strip() == line


def test_the_quickstart_fits_and_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["plan", QUICKSTART, f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("fits the memory this node has (GPU memory not checked: no GPU here)") or (
        torch.cuda.is_available() and out.strip().endswith("fits the memory this node has")
    )
    total = next(line for line in out.splitlines() if line.startswith("trainer rank")).split(": ")[1].split()
    assert total[1] == "MB" or float(total[0]) < 1.0, total


# ---------------------------------------------------------------------------------------------- LoRA


def lora_model(name: str, lora: LoRAConfig) -> torch.nn.Module:
    """Preset `name` wrapped with LoRA as the trainer wraps it."""
    torch.manual_seed(0)
    return apply_lora(load_model(materialize_preset(name)), lora)


LORAS = {
    "default": LoRAConfig(r=8),
    "some linears": LoRAConfig(r=4, alpha=8, target_modules=["o_proj", "self_attn.q_b_proj"], experts=False),
    "experts alone": LoRAConfig(r=2, target_modules=["no_such_layer"]),
}


@pytest.mark.parametrize("lora", sorted(LORAS))
@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"])
def test_lora_counts_the_adapters_peft_creates(name: str, lora: str) -> None:
    """The plan's adapters, counted from the architecture, are the parameters peft trains (the base
    frozen), its r-wide intermediates one per adapted linear, its merged expert weights the size of
    the adapted ones."""
    from peft.tuners.lora import Linear, ParamWrapper

    cfg = LORAS[lora]
    model = lora_model(name, cfg)
    adapters = Adapters.of(Architecture.of(model.config), cfg)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert adapters.params == sum(trainable.values())
    layers = [m for m in model.modules() if isinstance(m, Linear | ParamWrapper)]
    linears = [m for m in layers if not isinstance(m, ParamWrapper)]
    assert adapters.intermediate == cfg.r * len(linears)
    assert adapters.expert_elements == sum(m.get_param().numel() for m in layers if isinstance(m, ParamWrapper))
    assert bool(adapters.expert_elements) == cfg.experts
    # Adapted linears per layer: q, k, v, o; GLM-5's q_a, q_b, kv_a, kv_b, o (its indexer's left alone).
    per_layer = {"default": 5 if name == "tiny-glm5-moe" else 4, "some linears": 2 if name == "tiny-glm5-moe" else 1}
    assert len(linears) == model.config.num_hidden_layers * per_layer.get(lora, 0)


def test_lora_adapters_the_config_cannot_match_are_refused() -> None:
    arch = Architecture.of(preset_config("tiny-qwen3-moe", build_char_tokenizer()))
    with pytest.raises(ConfigError, match=r"match no layer; the policy has \[.*'q_proj'"):
        Adapters.of(arch, LoRAConfig(target_modules=["q_a_proj"], experts=False))


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-glm5-moe"])
def test_lora_activations_bound_what_autograd_keeps(name: str) -> None:
    """LoRA's backward keeps the frozen layers' activations (the plan counts full fine-tuning's, an
    upper bound), each adapter's r-wide intermediate, and every MoE layer's merged expert weights:
    the plan is at least autograd's count, and within 30% of it."""
    lora = LoRAConfig(r=8)
    model = lora_model(name, lora)
    arch = Architecture.of(model.config)
    adapters = Adapters.of(arch, lora)
    tokens = 64 if name == "tiny-glm5-moe" else 256
    moe_layers = arch.layers - arch.dense_layers
    per_token = moe_layers * layer_activation_elements(arch) + arch.dense_layers * layer_activation_elements(
        arch, moe=False
    )
    planned = tokens * (per_token + adapters.intermediate) + adapters.expert_elements
    measured = saved_per_token_layer(model, tokens) * tokens * arch.layers
    assert measured <= planned <= 1.3 * measured, (planned, measured)
    assert planned - adapters.expert_elements < measured  # the merged weights are kept


def test_lora_on_qwen3_30b_trains_a_fraction_of_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Qwen3-30B-A3B, r 8 on q, k, v, o and the experts, ZeRO-3 over 8 ranks in bf16: the base's
    weights as before, gradients, fp32 masters and moments for the adapters alone (1% of the
    policy), and peft's merged expert weights: one layer's with checkpointing, every layer's without."""
    arch = Architecture.of(AutoConfig.from_pretrained(QWEN3_30B))
    p = arch.params
    # Per layer: q (2048 -> 4096), k and v (2048 -> 512), o (4096 -> 2048); 128 experts' gate-up
    # (2048 -> 2 x 768) and down (768 -> 2048), each expert its own rank-8 pair.
    attention = 8 * ((2048 + 4096) + 2 * (2048 + 512) + (4096 + 2048))
    experts = 8 * 128 * ((2048 + 1536) + (768 + 2048))
    a = 48 * (attention + experts)
    assert a == 321_257_472
    layer_experts = 128 * (1536 * 2048 + 2048 * 768)

    def config(*overrides: str) -> RunConfig:
        base = ["trainer.precision=bf16", "trainer.num_ranks=8", "trainer.num_gpus=1", "model.dtype=bfloat16"]
        base += ["trainer.zero_stage=3", "trainer.max_tokens_per_micro_batch=16384"]
        return load_config(None, [*base, *overrides]).for_rl()

    def plan(*overrides: str) -> Plan:
        return plan_memory(config(*overrides), arch, prompt_tokens=1024)

    full, lora = plan(), plan("model.lora={r: 8}")
    assert lora.adapters is not None and lora.adapters.params == a
    assert lora.adapters.targets == ("q_proj", "k_proj", "v_proj", "o_proj", *EXPERT_PARAMETERS)
    assert lora.trainer["weights"] == full.trainer["weights"] == 2 * p // 8  # the base, bf16, partitioned
    assert lora.trainer["LoRA adapters"] == 2 * a // 8
    assert lora.trainer["gradients"] == 2 * a // 8
    assert lora.trainer["optimizer states"] == 12 * a // 8  # fp32 master and two moments
    assert lora.trainer["optimizer step temporaries"] == 4 * a // 8
    states = lambda plan: plan.trainer["gradients"] + plan.trainer["optimizer states"]  # noqa: E731
    assert states(full) > 50 * states(lora) and states(full) - states(lora) > 40 * GB
    assert lora.trainer_step < full.trainer_step / 4
    # Without checkpointing, every MoE layer keeps its merged experts for the backward (48 x 1.2 GB).
    assert lora.trainer["LoRA merged expert weights"] == 48 * 2 * layer_experts
    assert lora.trainer["activations"] == full.trainer["activations"] + 16384 * 48 * 4 * 8 * 2
    ckpt, ckpt_full = (plan(*o, "trainer.activation_checkpointing=true") for o in (["model.lora={r: 8}"], []))
    assert ckpt.trainer["LoRA merged expert weights"] == 2 * layer_experts
    # A layer's backward: twice its activations (an r-wide intermediate more per adapted linear and
    # token) and the gradient of its merged experts.
    lora_layer = 2 * 16384 * 4 * 8 * 2
    assert (
        ckpt.trainer["backward working set"]
        == ckpt_full.trainer["backward working set"] + lora_layer + 2 * layer_experts
    )
    assert ckpt.trainer_total < ckpt_full.trainer_total - 40 * GB
    offloaded = plan("model.lora={r: 8}", "trainer.offload_optimizer=true")
    assert offloaded.host["trainer optimizer states (offloaded)"] == 12 * a // 8 * 8  # 8 ranks on the node
    no_experts = plan("model.lora={r: 8, experts: false}")
    assert no_experts.adapters is not None and no_experts.adapters.params == 48 * attention
    assert "LoRA merged expert weights" not in no_experts.trainer

    lines = describe(lora, config("model.lora={r: 8}"))
    assert lines[2].startswith("LoRA: r 8 on q_proj, k_proj, v_proj, o_proj, mlp.experts.gate_up_proj")
    assert lines[2].endswith("321.3M adapter parameters (1.05% of the policy)")
    # 14 bytes an adapter parameter (bf16 gradient, fp32 master and moments) over 8 ranks, against 14 a parameter.
    assert lines[3].endswith("0.5 GB per rank (training every parameter: 49.8 GB)"), lines[3]
