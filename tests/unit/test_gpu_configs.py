"""The shipped GPU configs (configs/gpu/) pass `tidal check` once their placeholders (model path, data
files) name things that exist, ask for exactly the GPUs of the nodes they are written for, and fit
them by `tidal plan`, whose figures their headers quote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidal.cli import main
from tidal.config import load_config
from tidal.model.loading import build_char_tokenizer
from tidal.model.memory import GB, gb
from tidal.stages.plan import plan_run

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = REPO / "configs" / "gpu"
MODELS = GPU_CONFIGS / "models"  # the real models' config.json (no weights): what `tidal plan` reads
GPUS_PER_NODE = 8
H100, H200 = 79.6 * GB, 140.4 * GB  # what torch reports of an 80 GB and a 141 GB GPU

# What each file is written for: nodes of 8 GPUs of `gpu` memory, trainer ranks, vLLM workers and
# their tensor parallelism, the model (its config.json under configs/gpu/models), and whether it
# trains with a KL reference.
LAYOUTS = {
    "qwen3-30b-a3b-1node.yaml": {
        "nodes": 1,
        "gpu": H100,
        "ranks": 6,
        "workers": 1,
        "tp": 2,
        "model": "qwen3-30b-a3b",
        "kl": True,
    },
    "qwen3-30b-a3b-2nodes.yaml": {
        "nodes": 2,
        "gpu": H100,
        "ranks": 12,
        "workers": 2,
        "tp": 2,
        "model": "qwen3-30b-a3b",
        "kl": True,
    },
    "glm45-air-1node.yaml": {
        "nodes": 1,
        "gpu": H200,
        "ranks": 4,
        "workers": 1,
        "tp": 4,
        "model": "glm-4.5-air",
        "kl": False,
    },
    "glm45-air-2nodes.yaml": {
        "nodes": 2,
        "gpu": H100,
        "ranks": 12,
        "workers": 1,
        "tp": 4,
        "model": "glm-4.5-air",
        "kl": True,
    },
}
# A rank's CUDA context, NCCL buffers and the allocator's slack, beyond what the plan counts.
CUDA_OVERHEAD = 4 * GB


def check(path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, dict[str, Any], str]:
    """`tidal check PATH OVERRIDES...` in this process: (exit code, the resolved config, stderr)."""
    code = main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else {}), err


def placeholders(tmp_path: Path, name: str) -> list[str]:
    """Overrides that point the placeholders at a model directory and data files that exist: the
    model's real config.json and a tokenizer (the check reads both, never weights)."""
    shutil.copytree(MODELS / LAYOUTS[name]["model"], tmp_path / "model")
    build_char_tokenizer().save_pretrained(tmp_path / "model")
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return [
        f"model.path={tmp_path / 'model'}",
        f"data.source.train_files=['{tmp_path / 'train.jsonl'}']",
        f"data.source.eval_files=['{tmp_path / 'test.jsonl'}']",
    ]


def test_every_gpu_config_has_a_layout_here() -> None:
    assert sorted(p.name for p in GPU_CONFIGS.glob("*.yaml")) == sorted(LAYOUTS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_config_checks_and_fills_its_nodes(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = LAYOUTS[name]
    code, cfg, err = check(GPU_CONFIGS / name, capsys, *placeholders(tmp_path, name))
    assert code == 0, err
    model, rollout, trainer = cfg["model"], cfg["rollout"], cfg["trainer"]
    assert model["path"] == str(tmp_path / "model") and model["dtype"] == "bfloat16"
    assert cfg["data"]["source"]["train_files"] == [str(tmp_path / "train.jsonl")]

    assert (trainer["num_ranks"], trainer["num_gpus"]) == (layout["ranks"], 1)
    assert (trainer["zero_stage"], trainer["precision"]) == (3, "bf16")
    assert rollout["engine"] == "vllm"
    assert rollout["num_workers"] == layout["workers"]
    assert rollout["vllm"]["tensor_parallel_size"] == rollout["num_gpus_per_worker"] == layout["tp"]
    trainer_gpus = trainer["num_ranks"] * trainer["num_gpus"]
    rollout_gpus = rollout["num_workers"] * rollout["num_gpus_per_worker"]
    assert trainer_gpus + rollout_gpus == GPUS_PER_NODE * layout["nodes"]
    assert rollout["num_gpus_per_worker"] <= GPUS_PER_NODE  # one engine's GPUs are on one node

    # A prompt of the longest allowed length plus a full completion must fit vLLM's context.
    assert cfg["data"]["max_prompt_tokens"] + rollout["max_new_tokens"] <= rollout["vllm"]["max_model_len"]
    # Rank 0 stages snapshots in host memory and sends through one bucket-sized GPU buffer, so every
    # layout can broadcast over NCCL.
    transport = cfg["weight_sync"]["transport"]
    assert (transport["type"], transport["backend"]) == ("broadcast", "nccl")
    assert cfg["ray"]["address"] == "auto"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_config_fits_by_the_plan_its_header_quotes(name: str, tmp_path: Path) -> None:
    """`tidal plan`'s figures are in the header, a trainer rank fits its GPU with room for the CUDA
    context, a vLLM engine's weights fit its share of the GPU, and the KL reference is on where the
    layout says so."""
    layout, text = LAYOUTS[name], (GPU_CONFIGS / name).read_text()
    cfg = load_config(GPU_CONFIGS / name, placeholders(tmp_path, name)).for_rl()
    plan = plan_run(cfg)
    line = (
        f"# PLAN: {gb(plan.trainer_total)} per trainer rank, {gb(plan.engine['weights'])} of vLLM weights per GPU, "
        f"{gb(plan.host_total)} of host memory per node"
    )
    assert line in text.splitlines(), line
    assert plan.trainer_total + CUDA_OVERHEAD <= layout["gpu"], gb(plan.trainer_total)
    assert plan.engine["weights"] < cfg.rollout.vllm.gpu_memory_utilization * layout["gpu"]
    assert ("KL reference" in plan.trainer) == layout["kl"] == (cfg.algorithm.loss.kl.coef > 0)
    assert "IT DOES NOT FIT" not in text


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_gpu_config_with_lora_trains_a_fraction_and_fits(name: str, tmp_path: Path) -> None:
    """With `model.lora={r: 16}` (attention and experts) a config trains 1-2.5% of the policy: a rank
    keeps the base's weights, its gradients and its optimizer states (on the GPU or offloaded to the
    host) shrink as much, its KL reference is the base it holds anyway, and its peak stays under full
    fine-tuning's, within its GPU."""
    overrides = placeholders(tmp_path, name)
    full = plan_run(load_config(GPU_CONFIGS / name, overrides).for_rl())
    lora = plan_run(load_config(GPU_CONFIGS / name, [*overrides, "model.lora={r: 16}"]).for_rl())
    assert lora.adapters is not None and 0.01 < lora.adapters.params / lora.arch.params < 0.025
    assert lora.trainer["weights"] == full.trainer["weights"]
    assert lora.trainer["gradients"] < full.trainer["gradients"] / 40
    states = lambda plan: plan.trainer["optimizer states"] + plan.host.get("trainer optimizer states (offloaded)", 0)  # noqa: E731
    assert states(lora) < states(full) / 40
    assert lora.trainer_total < full.trainer_total and lora.trainer_total + CUDA_OVERHEAD <= LAYOUTS[name]["gpu"]
    assert "KL reference" not in lora.trainer  # the frozen base is the reference, adapters off


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unedited_placeholders_fail_with_one_line_naming_them(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = yaml.safe_load((GPU_CONFIGS / name).read_text())["model"]["path"]
    if Path(path).is_dir():
        pytest.skip(f"{path} exists on this machine")
    code, _, err = check(GPU_CONFIGS / name, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tidal: error:") and "model.path" in lines[0] and "train.jsonl" in lines[0]
