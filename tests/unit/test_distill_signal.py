"""On-policy distillation's pure parts: the teacher's per-token signal and its metrics against hand
values on a toy teacher and student, the `algorithm.distill` config (what it turns off, what it
refuses), and the start-up refusal of a teacher that does not share the policy's tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tidal.cli import main
from tidal.config import ConfigError, load_config
from tidal.model.forward import token_logprobs
from tidal.model.loading import (
    build_char_tokenizer,
    materialize_preset,
    preset_config,
    resolve_model_dir,
    warm_start_dir,
)
from tidal.runtime import absolute_plugin_paths
from tidal.telemetry.metrics import values
from tidal.trainer.distill import distill_advantages, teacher_signal

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------- signal

# A toy vocabulary of 3 tokens and one row: a prompt token, then 3 sampled tokens [2, 0, 1] and a
# pad. Logits at position t - 1 give token t's distribution. Student: [1/2, 1/4, 1/4] then
# [1/3, 1/3, 1/3] then [1/10, 3/5, 3/10]; teacher: [1/4, 1/4, 1/2], [3/4, 1/8, 1/8], [1/2, 1/4, 1/4].
STUDENT = [[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.6, 0.3]]
TEACHER = [[0.25, 0.25, 0.5], [0.75, 0.125, 0.125], [0.5, 0.25, 0.25]]
IDS = torch.tensor([[0, 2, 0, 1, 0]])
MASK = torch.tensor([[0, 1, 1, 1, 0]])


def logprobs(probs: list[list[float]]) -> torch.Tensor:
    """(1, 5) log-probs of IDS under the model whose distributions at positions 1..3 are `probs`."""
    logits = torch.zeros(1, 5, 3)
    logits[0, :3] = torch.tensor(probs).log()  # a softmax of log p is p
    return torch.where(MASK.bool(), token_logprobs(logits, IDS), 0.0)


def test_the_signal_is_log_teacher_minus_log_student_at_the_sampled_token() -> None:
    lp_teacher, lp_mu = logprobs(TEACHER), logprobs(STUDENT)
    # Sampled 2, 0, 1: teacher 1/2, 3/4, 1/4 against the student's 1/4, 1/3, 3/5.
    hand = [0.0, math.log(0.5 / 0.25), math.log(0.75 / (1 / 3)), math.log(0.25 / 0.6), 0.0]
    assert teacher_signal(lp_teacher, lp_mu, MASK)[0].tolist() == pytest.approx(hand, abs=1e-6)

    reward = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.0]])  # the sample's reward advantage on its tokens
    adv, m = distill_advantages(reward, lp_teacher, lp_mu, MASK, coef=2.0, reward_coef=0.5)
    want = [0.0, *(0.25 + 2.0 * h for h in hand[1:4]), 0.0]
    assert adv[0].tolist() == pytest.approx(want, abs=1e-6)
    m = values(m)
    assert m["distill/reverse_kl"] == pytest.approx(-sum(hand) / 3, abs=1e-6)
    assert m["distill/teacher_logp"] == pytest.approx((math.log(0.5) + math.log(0.75) + math.log(0.25)) / 3)
    teacher_abs = 2.0 * sum(abs(h) for h in hand) / 3
    assert m["distill/teacher_share"] == pytest.approx(teacher_abs / (teacher_abs + 0.25), abs=1e-6)
    assert m["distill/reverse_kl_pos0_3"] == pytest.approx(m["distill/reverse_kl"])
    assert not any(k.startswith("distill/reverse_kl_pos4") for k in m)  # no token there: left out

    # Alone (reward_coef 0): the teacher's term only, and all of the signal is the teacher's.
    alone, m = distill_advantages(reward, lp_teacher, lp_mu, MASK, coef=1.0, reward_coef=0.0)
    assert alone[0].tolist() == pytest.approx(hand, abs=1e-6) and values(m)["distill/teacher_share"] == 1.0


def test_a_teacher_equal_to_the_student_gives_no_signal() -> None:
    lp = logprobs(STUDENT)
    reward = torch.tensor([[0.0, -1.0, -1.0, -1.0, 0.0]])
    adv, m = distill_advantages(reward, lp.clone(), lp, MASK, coef=1.0)
    assert torch.equal(adv, reward)
    m = values(m)
    assert m["distill/reverse_kl"] == 0.0 and m["distill/teacher_share"] == 0.0


def test_masked_positions_and_position_buckets() -> None:
    """Values outside the mask (even -inf) reach nothing; a token's position is its index among its
    sample's trained tokens, and each bucket averages the tokens in it."""
    B, T = 2, 24
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[0, 2:22] = 1  # 20 trained tokens: positions 0..19
    mask[1, 5:8] = 1  # 3 trained tokens: positions 0..2
    mask[1, 10:12] = 1  # a tool's output between turns, then positions 3, 4
    position = torch.zeros(B, T)
    position[0, 2:22] = torch.arange(20.0)
    position[1, 5:8] = torch.arange(3.0)
    position[1, 10:12] = torch.tensor([3.0, 4.0])
    lp_mu = torch.where(mask.bool(), -position, -torch.inf)  # signal = position where trained
    lp_teacher = torch.zeros(B, T)
    adv, m = distill_advantages(torch.zeros(B, T), lp_teacher, lp_mu, mask, coef=1.0)
    assert torch.equal(adv, torch.where(mask.bool(), position, 0.0))
    m = values(m)
    kl = -position[mask.bool()]  # log mu - log p_T
    assert m["distill/reverse_kl"] == pytest.approx(float(kl.mean()))
    assert m["distill/reverse_kl_pos0_3"] == pytest.approx(-(0 + 1 + 2 + 3) * 2 / 8)
    assert m["distill/reverse_kl_pos4_15"] == pytest.approx(-(sum(range(4, 16)) + 4) / 13)
    assert m["distill/reverse_kl_pos16_63"] == pytest.approx(-(16 + 17 + 18 + 19) / 4)
    assert "distill/reverse_kl_pos64_255" not in m and "distill/reverse_kl_pos256_up" not in m


# ------------------------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def teacher() -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=1)


def test_distill_config_turns_the_zero_variance_filter_off(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, [f"algorithm.distill.teacher={teacher}"])
    d = cfg.algorithm.distill
    assert d is not None and d.coef == 1.0 and d.reward_coef == 1.0
    assert resolve_model_dir(d.teacher_model()) == teacher
    # Equal rewards still carry the teacher's signal: the filter is off unless asked for.
    assert not cfg.filter.zero_variance and load_config(None, []).filter.zero_variance
    on = load_config(None, [f"algorithm.distill.teacher={teacher}", "filter.zero_variance=true"])
    assert on.filter.zero_variance
    # Distillation needs no group: group_size 1 trains (the reward's group advantage is 0).
    load_config(None, [f"algorithm.distill.teacher={teacher}", "rollout.group_size=1"]).for_rl()
    with pytest.raises(ConfigError, match="group_size=1"):
        load_config(None, ["rollout.group_size=1"]).for_rl()

    # Without any reward: allowed with a teacher, refused without one, and never with the filter on.
    alone = load_config(None, [f"algorithm.distill.teacher={teacher}", "rewards.functions=[]"]).for_rl()
    assert alone.rewards.functions == [] and not alone.filter.zero_variance
    with pytest.raises(ConfigError, match="rewards.functions is empty"):
        load_config(None, ["rewards.functions=[]"]).for_rl()
    with pytest.raises(ConfigError, match="every group would be dropped"):
        load_config(None, [f"algorithm.distill.teacher={teacher}", "rewards.functions=[]", "filter.zero_variance=true"])

    # A run directory names its checkpoint; a path that is neither is refused.
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text("{}")
    d = load_config(None, [f"algorithm.distill.teacher={run}"]).algorithm.distill
    assert d is not None and resolve_model_dir(d.teacher_model()) == run / "checkpoint"
    # An SFT run config names its warm start, trained on first use.
    sft = REPO / "configs" / "sft_arithmetic.yaml"
    d = load_config(None, [f"algorithm.distill.teacher={sft}"]).algorithm.distill
    assert d is not None and d.teacher_model().sft_warm_start == str(sft)
    assert resolve_model_dir(d.teacher_model()) == warm_start_dir(sft) / "checkpoint"
    # The actors may not share the driver's working directory: they get the teacher's absolute path.
    monkeypatch.chdir(REPO)
    relative = load_config(None, ["algorithm.distill.teacher=configs/sft_arithmetic.yaml"])
    absolute = absolute_plugin_paths(relative).algorithm.distill
    assert absolute is not None and absolute.teacher == str(sft)
    with pytest.raises(ConfigError, match="algorithm.distill.teacher .* is neither a save_pretrained"):
        load_config(None, [f"algorithm.distill.teacher={tmp_path}"])
    with pytest.raises(ConfigError, match="coef"):
        load_config(None, [f"algorithm.distill.teacher={teacher}", "algorithm.distill.coef=0"])


# -------------------------------------------------------------------------------------------- start


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `tidal check ARGS...` refuses them with (exit 2, nothing on stdout)."""
    code = main(["check", *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("tidal: error: "), err
    return lines[0]


def teacher_dir(root: Path, name: str, *, swap: bool = False, eos: str | None = None, extra_vocab: int = 0) -> Path:
    """A teacher's config and tokenizer (no weights: the checks never load them), the policy's but for
    two tokens' ids swapped (`swap`), another end-of-sequence token (`eos`) or a larger vocab_size."""
    tok = build_char_tokenizer()
    if eos is not None:
        tok.eos_token = eos
    config = preset_config("tiny-qwen3-moe", tok)
    config.vocab_size += extra_vocab
    out = root / name
    config.save_pretrained(out)
    tok.save_pretrained(out)
    if swap:
        file = out / "tokenizer.json"
        spec = json.loads(file.read_text())
        vocab = spec["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        file.write_text(json.dumps(spec))
    return out


def test_a_teacher_with_another_tokenizer_or_vocab_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    materialize_preset("tiny-qwen3-moe")
    run = tmp_path / "run.yaml"
    run.write_text("model: {preset: tiny-qwen3-moe}\ndata: {source: {train_size: 64, eval_size: 8}}\n")
    base = [str(run), f"output_dir={tmp_path / 'runs'}"]
    same = teacher_dir(tmp_path, "same")
    code = main(["check", *base, f"algorithm.distill.teacher={same}"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    line = refused(capsys, *base, f"algorithm.distill.teacher={teacher_dir(tmp_path, 'swapped', swap=True)}")
    assert "has another tokenizer than the policy: 2 tokens have other ids" in line and "'a'" in line
    line = refused(capsys, *base, f"algorithm.distill.teacher={teacher_dir(tmp_path, 'eos', eos='<unk>')}")
    assert "ends sequences with token 3, the policy with 2" in line
    line = refused(capsys, *base, f"algorithm.distill.teacher={teacher_dir(tmp_path, 'wide', extra_vocab=8)}")
    assert "vocab_size" in line and "different ids" in line


def test_the_memory_plan_counts_the_teacher(teacher: Path) -> None:
    """The teacher is held as the KL reference is: its weights in the training dtype on every rank,
    split over the ranks at ZeRO-3, through the backward and the optimizer step."""
    from tidal.model.memory import Architecture
    from tidal.stages.plan import plan_run, policy_config

    params = Architecture.of(policy_config(load_config(None, [f"model.path={teacher}"]).model)).params
    without = plan_run(load_config(None, []))
    plan = plan_run(load_config(None, [f"algorithm.distill.teacher={teacher}"]))
    assert plan.trainer["distillation teacher"] == params * 4
    assert plan.trainer_total == without.trainer_total + params * 4
    split = ["trainer.zero_stage=3", "trainer.num_ranks=2", "trainer.precision=bf16"]
    plan = plan_run(load_config(None, [f"algorithm.distill.teacher={teacher}", *split]))
    assert plan.trainer["distillation teacher"] == params * 2 // 2
