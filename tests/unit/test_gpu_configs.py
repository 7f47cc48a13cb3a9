"""The shipped GPU configs (configs/gpu/) pass `tidal check` once their placeholders (model path, data
files) name things that exist, and ask for exactly the GPUs of the nodes they are written for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidal.cli import main
from tidal.model.loading import build_char_tokenizer

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = REPO / "configs" / "gpu"
GPUS_PER_NODE = 8
GPU_GB = 141.0  # NVIDIA H200

# What each file is written for: nodes of 8 GPUs, trainer ranks, vLLM workers and their tensor
# parallelism; the model's parameters (billions) and the activations per trainer rank at
# micro_batch_size 1 and 4k tokens without activation checkpointing (the top of the header's
# estimate, GB); whether the header says it fits (the header comment of each file says why).
LAYOUTS = {
    "qwen3-30b-a3b-1node.yaml": {
        "nodes": 1,
        "ranks": 6,
        "workers": 2,
        "tp": 1,
        "params_b": 30.5,
        "act_gb": 45,
        "fits": True,
    },
    "qwen3-30b-a3b-2nodes.yaml": {
        "nodes": 2,
        "ranks": 8,
        "workers": 4,
        "tp": 2,
        "params_b": 30.5,
        "act_gb": 45,
        "fits": True,
    },
    "glm45-air-1node.yaml": {
        "nodes": 1,
        "ranks": 4,
        "workers": 1,
        "tp": 4,
        "params_b": 106,
        "act_gb": 70,
        "fits": False,
    },
    "glm45-air-2nodes.yaml": {
        "nodes": 2,
        "ranks": 8,
        "workers": 2,
        "tp": 4,
        "params_b": 106,
        "act_gb": 70,
        "fits": False,
    },
}


def check(path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, dict[str, Any], str]:
    """`tidal check PATH OVERRIDES...` in this process: (exit code, the resolved config, stderr)."""
    code = main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else {}), err


def placeholders(tmp_path: Path) -> list[str]:
    """Overrides that point the placeholders at a model directory and data files that exist. The
    check reads the model's config and tokenizer, never weights: the config holds the smaller of the
    two models' position limits (Qwen3-30B-A3B's 40960; GLM-4.5-Air's is 131072)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"max_position_embeddings": 40960}))
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
    code, cfg, err = check(GPU_CONFIGS / name, capsys, *placeholders(tmp_path))
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
def test_gpu_config_header_says_whether_it_fits(name: str) -> None:
    """The headers' arithmetic: a vLLM engine's share of the bf16 weights (2 bytes per parameter) fits
    the share of its GPUs vLLM takes, and ZeRO-3's 16 bytes per parameter over the ranks plus the
    activations fit a trainer GPU exactly where the header does not say IT DOES NOT FIT."""
    layout, text = LAYOUTS[name], (GPU_CONFIGS / name).read_text()
    cfg = yaml.safe_load(text)
    vllm = cfg["rollout"]["vllm"]
    assert 2 * layout["params_b"] / vllm["tensor_parallel_size"] < GPU_GB * vllm["gpu_memory_utilization"]
    trainer_gb = 16 * layout["params_b"] / layout["ranks"] + layout["act_gb"]
    assert (trainer_gb <= GPU_GB) == layout["fits"] == ("IT DOES NOT FIT" not in text), trainer_gb


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unedited_placeholders_fail_with_one_line_naming_them(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = yaml.safe_load((GPU_CONFIGS / name).read_text())["model"]["path"]
    if Path(path).is_dir():
        pytest.skip(f"{path} exists on this machine")
    code, _, err = check(GPU_CONFIGS / name, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tidal: error:") and "model.path" in lines[0] and "train.jsonl" in lines[0]
