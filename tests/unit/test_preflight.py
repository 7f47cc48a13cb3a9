"""`tidal check` runs the start-up checks of the stage it is asked about (`tidal train` by default,
`--stage sft`), the same functions the stage runs: a config it accepts starts, one it refuses is
refused with one line. Among them: every generation fits the model's positions."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

from tidal.cli import main
from tidal.model.loading import build_char_tokenizer, materialize_preset, preset_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SFT = str(REPO / "configs" / "sft_arithmetic.yaml")


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`tidal check ARGS...` in this process: (exit code, stdout, stderr)."""
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `tidal check ARGS...` refuses them with (exit 2, nothing on stdout)."""
    code, out, err = check(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("tidal: error: "), err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def presets() -> None:
    """The presets the configs here name, built before a check's output is read (a first build logs)."""
    for name in ("tiny-glm4-moe", "tiny-qwen3-moe"):
        materialize_preset(name)


@pytest.fixture
def short_model(tmp_path: Path) -> Path:
    """A model directory (config and tokenizer, no weights: checks never load them) of 64 positions."""
    tok = build_char_tokenizer()
    config = preset_config("tiny-qwen3-moe", tok)
    config.max_position_embeddings = 64
    out = tmp_path / "short"
    config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# The list of test_cli.py's test_train_user_mistakes_exit_2_before_any_actor_starts, and the new ones.
@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["trainer.grad_accum=4"], "trainer.grad_accum=4 applies to `tidal sft` only"),
        (["rollout.group_size=1"], "rollout.group_size=1 with algorithm.advantage=grpo"),
        (["rollout.group_size=1", "algorithm.advantage=rloo"], "every advantage is 0"),
        (["rollout.temperature=0"], "rollout.temperature=0 (greedy) cannot train"),
        (["rollout.top_p=0.9"], "rollout.top_p=0.9 truncates the sampling distribution"),
        (["rollout.top_k=20"], "rollout.top_k=20 truncates the sampling distribution"),
        (["data.max_prompt_tokens=2"], "arithmetic train problem 0: the prompt has"),
        (["data.source.digits=1", "data.source.eval_size=80"], "data.source.eval_size=80 is more than half"),
        (["rewards.functions=[{path: ./no_such_reward.py:score}]"], "rewards.functions[0].path"),
        (["rewards.functions=[{name: regex}]"], "pattern"),
        (["envs=[{name: no_such_env}]"], "envs[0].name"),
        (["rollout.max_new_tokens=5000"], "rollout.max_new_tokens=5000 leaves no room for a prompt"),
        (["eval.max_new_tokens=4096"], "eval.max_new_tokens=4096 leaves no room for a prompt"),
    ],
)
def test_check_refuses_what_train_refuses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: list[str], needle: str
) -> None:
    line = refused(capsys, SFT, f"output_dir={tmp_path}", *overrides)
    assert needle in line


def test_top_p_and_top_k_are_refused_for_rl_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = refused(capsys, SFT, "rollout.top_p=0.9")
    assert "the trainer's log-probs are of the untruncated distribution" in line and "rollout.top_p=1" in line
    # `tidal sft` samples nothing (its evaluation is greedy), so the settings are not its concern.
    code, out, err = check(capsys, "--stage", "sft", SFT, "rollout.top_p=0.9", "rollout.top_k=20")
    assert code == 0, err
    assert yaml.safe_load(out)["rollout"]["top_k"] == 20


def test_sft_check_applies_the_rules_of_sft(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(capsys, "--stage", "sft", SFT, "trainer.grad_accum=4", "rollout.group_size=1")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["trainer"]["grad_accum"] == 4 and resolved["trainer"]["lr"] == pytest.approx(3e-3)
    # Its held-out evaluation generates eval.max_new_tokens, or rollout.max_new_tokens when unset.
    line = refused(capsys, "--stage", "sft", SFT, "eval.max_new_tokens=5000")
    assert "eval.max_new_tokens=5000 leaves no room" in line
    line = refused(capsys, "--stage", "sft", SFT, "eval.max_new_tokens=null", "rollout.max_new_tokens=4096")
    assert "rollout.max_new_tokens=4096 (eval.max_new_tokens unset) leaves no room" in line


def test_the_defaults_fit_the_presets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An SFT config on a preset that sets no token limits evaluates within the model's positions."""
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"model": {"preset": "tiny-qwen3-moe"}, "envs": [{"name": "calculator"}]}))
    for stage in ("sft", "train"):
        code, out, err = check(capsys, "--stage", stage, str(bare))
        assert code == 0, err
        assert yaml.safe_load(out)["rollout"]["max_new_tokens"] == 1024
    assert preset_config("tiny-qwen3-moe", build_char_tokenizer()).max_position_embeddings == 4096


def test_a_generation_longer_than_the_model_is_refused_naming_the_keys(
    capsys: pytest.CaptureFixture[str], short_model: Path
) -> None:
    model = f"model.path={short_model}"
    line = refused(capsys, SFT, model, "rollout.max_new_tokens=64")
    assert line == (
        "tidal: error: rollout.max_new_tokens=64 leaves no room for a prompt within the model's "
        "max_position_embeddings=64 (a prompt and its completion share them); lower "
        "rollout.max_new_tokens"
    )
    # The arithmetic prompts have up to 6 tokens ("99+99="): 58 new tokens fit 64 positions, 59 do not.
    assert check(capsys, SFT, model, "rollout.max_new_tokens=58")[0] == 0
    line = refused(capsys, SFT, model, "rollout.max_new_tokens=59")
    assert (
        "the prompt has 6 tokens, and rollout.max_new_tokens=59 more make 65 > the model's "
        "max_position_embeddings=64; lower rollout.max_new_tokens or shorten the row" in line
    )
    assert line.startswith("tidal: error: arithmetic train problem ")
    # The held-out split with the evaluation's limit.
    line = refused(capsys, SFT, model, "rollout.max_new_tokens=8", "eval.max_new_tokens=59")
    assert line.startswith("tidal: error: arithmetic eval problem ") and "eval.max_new_tokens=59 more make 65" in line
    # Multi-turn episodes grow to rollout.max_context_tokens, whatever the turns' limit.
    calc = ["envs=[{name: calculator}]", "rollout.max_new_tokens=8"]
    line = refused(capsys, SFT, model, *calc)
    assert "rollout.max_context_tokens=4096 is more than the model's max_position_embeddings=64" in line
    assert check(capsys, SFT, model, *calc, "rollout.max_context_tokens=64")[0] == 0
    # So do an agent's (examples/agent's), and their turns' routing is not recorded.
    agent = [f"envs=[{{agent: {REPO}/examples/agent/calculator_agent.py:run}}]", "rollout.max_new_tokens=8"]
    line = refused(capsys, SFT, model, *agent)
    assert "rollout.max_context_tokens=4096 is more than the model's max_position_embeddings=64" in line
    line = refused(capsys, SFT, model, *agent, "rollout.max_context_tokens=64", "rollout.record_routing=true")
    assert "record_routing works with single-turn envs for now (a multi-turn or agent episode's" in line
    # vLLM's context is its own limit.
    line = refused(capsys, SFT, model, "rollout.engine=vllm", "rollout.vllm.max_model_len=128")
    assert "rollout.vllm.max_model_len=128 is more than the model's max_position_embeddings=64" in line
    line = refused(
        capsys, SFT, model, "rollout.engine=vllm", "rollout.vllm.max_model_len=32", "rollout.max_new_tokens=30"
    )
    assert "rollout.max_new_tokens=30 more make 36 > rollout.vllm.max_model_len=32" in line


def test_a_model_directory_without_a_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = refused(capsys, SFT, f"model.path={tmp_path}")
    assert f"model.path {str(tmp_path)!r} has no config.json" in line


def test_check_refuses_a_run_directory_train_would_refuse(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    step = tmp_path / "x" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "driver.pkl").write_bytes(pickle.dumps({"step": 2, "config": {}}))
    (step / "manifest.json").write_text(json.dumps({"driver.pkl": (step / "driver.pkl").stat().st_size}))
    assert "already holds checkpoints" in refused(capsys, SFT, f"output_dir={tmp_path}", "name=x")
    line = refused(capsys, SFT, f"output_dir={tmp_path}", "name=x", "train.resume=true")
    assert "cannot resume" in line and "model.preset" in line
    assert not (tmp_path / "x" / "config.yaml").exists()  # a check writes nothing


@pytest.mark.parametrize(
    "path", ["configs/quickstart.yaml", "configs/sft_arithmetic.yaml", "examples/custom_env/config.yaml"]
)
def test_shipped_configs_pass_the_check_of_their_stage(
    capsys: pytest.CaptureFixture[str], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # their plugin and warm-start paths are relative to the repository
    stage = "sft" if "sft" in path else "train"
    code, out, err = check(capsys, "--stage", stage, path)
    assert code == 0, err
    assert yaml.safe_load(out)["trainer"]["lr"] == pytest.approx(3e-3 if stage == "sft" else 3e-4)
