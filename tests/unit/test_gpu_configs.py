"""The shipped GPU configs (configs/gpu/) pass `tidal check` once their placeholders (model path, data
files) name things that exist, and ask for exactly the GPUs of the nodes they are written for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidal.cli import main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIGS = REPO / "configs" / "gpu"
GPUS_PER_NODE = 8

# What each file is written for: nodes of 8 GPUs, trainer ranks, vLLM workers and their tensor
# parallelism, and the weight transport (the header comment of each file says why).
LAYOUTS = {
    "qwen3-30b-a3b-1node.yaml": {"nodes": 1, "ranks": 5, "workers": 3, "tp": 1, "transport": "object_store"},
    "qwen3-30b-a3b-2nodes.yaml": {"nodes": 2, "ranks": 10, "workers": 3, "tp": 2, "transport": "broadcast"},
    "glm45-air-1node.yaml": {"nodes": 1, "ranks": 4, "workers": 1, "tp": 4, "transport": "broadcast"},
    "glm45-air-2nodes.yaml": {"nodes": 2, "ranks": 8, "workers": 2, "tp": 4, "transport": "broadcast"},
}


def check(path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, dict[str, Any], str]:
    """`tidal check PATH OVERRIDES...` in this process: (exit code, the resolved config, stderr)."""
    code = main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else {}), err


def placeholders(tmp_path: Path) -> list[str]:
    """Overrides that point the placeholders at a model directory and data files that exist."""
    (tmp_path / "model").mkdir()
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return [f"model.path={tmp_path / 'model'}", f"data.source.train_files=['{tmp_path / 'train.jsonl'}']",
            f"data.source.eval_files=['{tmp_path / 'test.jsonl'}']"]  # fmt: skip


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
    transport = cfg["weight_sync"]["transport"]
    assert transport["type"] == layout["transport"]
    if transport["type"] == "broadcast":
        assert transport["backend"] == "nccl"
    assert cfg["ray"]["address"] == "auto"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_unedited_placeholders_fail_with_one_line_naming_them(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = yaml.safe_load((GPU_CONFIGS / name).read_text())["model"]["path"]
    if Path(path).is_dir():
        pytest.skip(f"{path} exists on this machine")
    code, _, err = check(GPU_CONFIGS / name, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tidal: error:") and "model.path" in lines[0] and "train.jsonl" in lines[0]
