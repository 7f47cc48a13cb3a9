"""The RL path in-process on CPU: RolloutWorker samples, the RL step against plain torch for every
aggregation (uneven micro-batches, truncated IS weights), TrainerActor.step and weight publishing."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

import tidal.trainer.actor as actor_module
from tidal.config import LossConfig, RunConfig, TISCorrection, TrainerConfig, load_config
from tidal.model.forward import batch_logprobs, token_logprobs
from tidal.model.loading import load_model, load_tokenizer
from tidal.rollout.worker import RolloutWorker, WorkerConfig
from tidal.telemetry.metrics import values
from tidal.trainer.actor import TrainerActor, TrainerActorConfig
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.losses import aggregate, policy_loss
from tidal.trainer.offpolicy import m2po_mask
from tidal.trainer.rl import RLLoss, build_batch, loss_denominator
from tidal.types import Group, Prompt, Sample, TrainBatch

pytestmark = pytest.mark.integration

MAX_NEW = 4
ROWS = [Prompt(7, {"prompt": "12+7=", "answer": "19"}), Prompt(8, {"prompt": "3-5=", "answer": "-2"})]
OVERRIDES = [
    "model.preset=tiny-qwen3-moe",
    "rollout.group_size=4",
    f"rollout.max_new_tokens={MAX_NEW}",
    "trainer.micro_batch_size=3",
    "trainer.lr=1e-3",
    "monitor.wandb=disabled",
    # exact_match at weight 0.5 beside arithmetic: a reward of 0.5 shows the weighted sum and sub-scores.
    "rewards.functions=[{name: arithmetic}, {name: exact_match, weight: 0.5}]",
]


def config(*extra: str) -> RunConfig:
    return load_config(None, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def groups(preset: Path) -> list[Group]:
    """Version-0 groups with rewards set by hand (a random model scores 0), so GRPO has signal."""
    out = RolloutWorker(WorkerConfig.of(config()), str(preset)).rollout(ROWS, seed=0).groups
    for g in out:
        for j, s in enumerate(g.samples):
            s.reward = float(j % 2)
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------- rollout


def check_sample(s: Sample, gid: int, row: dict[str, Any], tok: PreTrainedTokenizerBase) -> None:
    n = len(s.response_ids)
    assert s.group_id == gid and s.row == row
    assert s.prompt_ids == tok(row["prompt"], add_special_tokens=False)["input_ids"]
    assert 1 <= n <= MAX_NEW and len(s.logp_mu) == len(s.loss_mask) == len(s.versions) == n
    assert all(math.isfinite(lp) and lp <= 0 for lp in s.logp_mu)
    assert s.loss_mask == [1] * n and s.version == 0 and s.versions == [0] * n
    eos = s.response_ids[-1] == tok.eos_token_id
    assert s.finish_reason == ("stop" if eos else "length")
    assert eos or n == MAX_NEW  # without eos only the length limit ends a completion
    assert tok.eos_token_id not in s.response_ids[:-1]
    assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
    exact = float(s.text.strip() == str(row["answer"]).strip())
    arith = float(exact and s.text.strip().lstrip("-").isdigit())
    assert s.scores == {"arithmetic": arith, "exact_match": exact}
    assert s.reward == arith + 0.5 * exact and s.reward_errors == []


def test_rollout_worker_samples(preset: Path) -> None:
    tok = load_tokenizer(preset)
    worker = RolloutWorker(WorkerConfig.of(config()), str(preset))
    runs = {seed: worker.rollout(ROWS, seed=seed).groups for seed in (7, 3)}
    for out in runs.values():
        assert [g.group_id for g in out] == [7, 8] and [len(g.samples) for g in out] == [4, 4]
        for g, p in zip(out, ROWS, strict=True):
            for s in g.samples:
                check_sample(s, p.group_id, p.row, tok)
    finished = [(s.finish_reason, len(s.response_ids)) for out in runs.values() for g in out for s in g.samples]
    # These seeds stop on eos both before and at the length limit, so both branches are checked.
    assert ("stop", MAX_NEW) in finished and any(f == "stop" and n < MAX_NEW for f, n in finished)

    # The same seed again, now with group 7's answer set to its first completion: same tokens, and
    # exact_match scores that completion 1 (weighted 0.5 in the reward).
    first = runs[7][0].samples[0]
    rows = [Prompt(7, {**ROWS[0].row, "answer": first.text}), ROWS[1]]
    again = worker.rollout(rows, seed=7).groups
    fields = ("prompt_ids", "response_ids", "logp_mu", "finish_reason", "text")
    key = [[tuple(str(getattr(s, f)) for f in fields) for s in g.samples] for g in runs[7]]
    assert [[tuple(str(getattr(s, f)) for f in fields) for s in g.samples] for g in again] == key
    for g, p in zip(again, rows, strict=True):
        for s in g.samples:
            check_sample(s, p.group_id, p.row, tok)
    assert again[0].samples[0].scores["exact_match"] == 1.0 and again[0].samples[0].reward == 0.5
    other = worker.rollout(ROWS, seed=0).groups
    assert [s.response_ids for g in other for s in g.samples] != [s.response_ids for g in runs[7] for s in g.samples]


# ------------------------------------------------------------------------------- RL step vs torch

LENGTHS = [[3, 5, 2], [6, 4]]  # 5 rows: micro-batches of 2 rows hold 8, 8 and 4 response tokens
REWARDS = [[1.0, 0.0, 0.5], [0.0, 1.0]]
DELTA = [0.0, 0.6, 0.3, -0.3]  # logp_mu = logp - delta: k = e^delta is 1, 1.82 (truncated at 1.5), 1.35, 0.74
M = 8


def hand_batch(preset: Path) -> TrainBatch:
    tok, model = load_tokenizer(preset), load_model(preset)
    g = torch.Generator().manual_seed(0)
    groups = [
        Group(
            p.group_id,
            [
                Sample(
                    p.group_id,
                    tok(p.row["prompt"], add_special_tokens=False)["input_ids"],
                    torch.randint(6, 100, (n,), generator=g).tolist(),
                    [1] * n,
                    [0.0] * n,
                    "length",
                    0,
                    [0] * n,
                    reward=r,
                )
                for n, r in zip(lengths, rewards, strict=True)
            ],
        )
        for p, lengths, rewards in zip(ROWS, LENGTHS, REWARDS, strict=True)
    ]
    batch, _ = build_batch(groups, "grpo", tok.pad_token_id)
    true = batch_logprobs(model, batch, 1.0, micro_batch_size=5)
    for i, s in enumerate(s for grp in groups for s in grp.samples):
        p = len(s.prompt_ids)
        s.logp_mu = [true[i, p + t].item() - DELTA[t % len(DELTA)] for t in range(len(s.response_ids))]
    batch, _ = build_batch(groups, "grpo", tok.pad_token_id)
    batch.logp_old = batch_logprobs(model, batch, 1.0, micro_batch_size=2)
    assert torch.allclose(batch.logp_old, true, atol=1e-5)
    return batch


# Bounds, measured as in test_trainer_deepspeed.py (2-core AMD EPYC; torch's CPU kernels at AVX512,
# AVX2 or none, oneDNN at SSE4.1 or AVX2, MKL_CBWR=COMPATIBLE, 1, 2 or 4 threads). Largest
# per-parameter relative gradient error ||g_ds - g|| / ||g||: measured 1.2e-6 to 1.5e-6 in every mode,
# bound 1e-4; a per-micro-batch mean gives 0.42 (0.43 sequence-mean), 4000 times the bound. The loss
# sums advantage-weighted terms of both signs that nearly cancel, so its relative error is amplified:
# measured up to 4.2e-6 (sequence-mean), bound 1e-4, a margin of 24; a per-micro-batch mean changes it
# by 94% or more.
RL_GRAD_TOL = 1e-4
RL_LOSS_TOL = 1e-4


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(named.items(), grads, strict=True)}


def grad_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The largest per-parameter relative error ||got - ref|| / ||ref||."""
    assert got.keys() == ref.keys()
    return max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def mean_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int) -> torch.Tensor:
    """The loss of one full batch by `aggregate`'s numerator and denominator."""
    num, den = aggregate(per_token, mask, mode, max_len)
    return num / den


@pytest.mark.parametrize("mode", ["token-mean", "sequence-mean", "constant"])
def test_rl_step_matches_plain_torch(preset: Path, mode: str) -> None:
    """The trainer's RL gradient, in uneven micro-batches, is plain torch's on the whole batch."""
    batch = hand_batch(preset)
    loss_cfg = LossConfig(correction=TISCorrection(c=1.5), aggregation=mode)
    cfg = TrainerConfig(lr=1e-3, eps=1e-6, max_grad_norm=None, micro_batch_size=2)

    model = load_model(preset)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.loss_mask.float()
    logp = token_logprobs(logits, batch.input_ids, 1.0)
    per_token, m = policy_loss(logp, batch.logp_old, batch.logp_mu, batch.advantages, mask, loss_cfg)
    loss = mean_loss(per_token, mask, mode, M)
    # The wrong normaliser to rule out: each micro-batch's own aggregate, averaged over micro-batches.
    micros = [slice(i, i + cfg.micro_batch_size) for i in range(0, len(mask), cfg.micro_batch_size)]
    per_micro = sum(mean_loss(per_token[r], mask[r], mode, M) for r in micros) / len(micros)
    ref, ref_per_micro = gradients(model, loss), gradients(model, per_micro)
    ref_norm = torch.nn.utils.get_total_norm(list(ref.values())).item()
    assert values(m)["offpolicy/frac_truncated"] == pytest.approx(6 / 20)  # weights both truncated and not
    assert abs(loss.item()) > 1e-2

    trainer = DeepSpeedTrainer(load_model(preset), cfg)
    rl_loss = RLLoss(loss_cfg, temperature=1.0, max_len=M, moe_metrics=False)
    grads: dict[str, torch.Tensor] = {}
    normalizer = loss_denominator(batch, loss_cfg, M)
    metrics = values(trainer.train_step(batch, loss_fn=rl_loss, normalizer=normalizer, on_grads=grads.update))

    assert metrics["micro_batches"] == 3 and metrics["tokens"] == 20
    assert metrics["loss"] == pytest.approx(loss.item(), rel=RL_LOSS_TOL)
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=RL_GRAD_TOL)
    assert metrics["offpolicy/frac_truncated"] == pytest.approx(values(m)["offpolicy/frac_truncated"], rel=1e-6)
    assert grad_error(grads, ref) < RL_GRAD_TOL
    assert grad_error(grads, ref_per_micro) > 1000 * RL_GRAD_TOL  # a wrong normaliser fails widely
    assert max_diff(trainer.state_dict_for_export(), model.state_dict()) > 5e-4  # the step moved the weights


# ----------------------------------------------------------------------------------- TrainerActor


def finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_trainer_actor_step(preset: Path, groups: list[Group]) -> None:
    actor = TrainerActor(TrainerActorConfig.of(config("algorithm.minibatches=2")), str(preset))
    result = actor.step(groups)
    m = values(result.metrics)
    assert actor.version == result.version == 2 and result.trained and finite(m)
    assert m["train/samples"] == 8
    assert m["perf/train_tokens"] == sum(len(s.response_ids) for g in groups for s in g.samples)
    assert m["train/grad_norm"] > 0 and m["train/loss"] != 0
    assert m["async/staleness_mean"] == 0 and m["async/staleness_max"] == 0
    assert m["rollout/logp_mismatch_max"] < 1e-4  # the worker sampled with these very weights
    assert m["offpolicy/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["offpolicy/ess"] == pytest.approx(1.0, abs=1e-6) and m["offpolicy/m2"] < 1e-8
    assert "offpolicy/clipped_token_entropy" in m and "offpolicy/truncated_token_entropy" in m

    # The same version-0 samples two optimizer steps later: stale by 2, and pi_old has moved off mu.
    m = values(actor.step(groups).metrics)
    assert actor.version == 4 and finite(m)
    assert m["async/staleness_mean"] == 2 and m["async/staleness_max"] == 2
    assert m["async/token_staleness_mean"] == 2
    assert m["async/staleness_frac_0"] == 0.0  # the histogram covers ages 0..max_staleness
    assert m["rollout/logp_mismatch_max"] > 1e-3
    assert m["offpolicy/is_weight_mean"] != pytest.approx(1.0, abs=1e-4)
    assert m["offpolicy/ess"] < 1.0 and m["offpolicy/m2"] > 1e-6

    skipped = actor.step([])
    assert not skipped.trained and skipped.version == 4
    assert values(skipped.metrics)["train/skipped_steps"] == 1.0 and "train/loss" not in skipped.metrics
    assert actor.version == 4
    assert actor.ledger() == {"trained_groups": 4, "unique_trained_groups": 2}  # the same groups twice


def test_behavior_correction_skips_recompute(
    preset: Path, groups: list[Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_recompute(*_: Any, **__: Any) -> torch.Tensor:
        raise AssertionError("behavior correction must not recompute log-probs")

    monkeypatch.setattr(actor_module, "batch_logprobs", no_recompute)
    cfg = config("algorithm.minibatches=2", "algorithm.loss.correction.type=behavior")
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(preset))
    m = values(actor.step(groups).metrics)
    assert actor.version == 2 and finite(m)
    assert "rollout/logp_mismatch_mean" not in m and "rollout/logp_mismatch_max" not in m
    assert m["offpolicy/is_weight_mean"] == 1.0 and m["train/grad_norm"] > 0


def test_one_minibatch_takes_pi_old_from_the_update_forward(
    preset: Path, groups: list[Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one minibatch the update's forward runs on pi_old's weights: `recompute_pi_old: auto`
    skips the separate forward and must train and report exactly as `always` does, including on
    samples one version stale (pi_old off mu)."""
    calls: list[int] = []

    def counted(model: Any, batch: TrainBatch, *args: Any) -> torch.Tensor:
        calls.append(batch.input_ids.shape[0])
        return batch_logprobs(model, batch, *args)

    monkeypatch.setattr(actor_module, "batch_logprobs", counted)
    actors = {
        mode: TrainerActor(TrainerActorConfig.of(config(f"algorithm.recompute_pi_old={mode}")), str(preset))
        for mode in ("always", "auto")
    }
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in actors}
    for mode, actor in actors.items():
        calls.clear()
        runs[mode] = [values(actor.step(groups).metrics) for _ in range(2)]  # the second: stale by 1
        assert calls == ([8, 8] if mode == "always" else [])
        assert all(("perf/recompute_skipped" in m) == (mode == "auto") for m in runs[mode])
    stale = runs["auto"][1]
    assert stale["async/staleness_max"] == 1 and stale["offpolicy/m2"] > 1e-6  # the check has teeth
    for key in (
        "train/loss",
        "train/grad_norm",
        "offpolicy/m2",
        "offpolicy/ess",
        "offpolicy/is_weight_mean",
        "rollout/logp_mismatch_mean",
        "rollout/logp_mismatch_max",
        "offpolicy/m2_per_version",
    ):
        for a, b in zip(runs["always"], runs["auto"], strict=True):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert max_diff(actors["auto"].snapshot()[0], actors["always"].snapshot()[0]) < 1e-6


def test_m2po_step_masks_over_the_whole_batch(
    preset: Path, groups: list[Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step with `trust_region: m2po` through TrainerActor. The behavior log-probs of each sample's
    first token are lowered by 2, so log(pi_old / mu) is 2 there and ~0 elsewhere (version-0 samples):
    M2 = 4 * 8 / n, and the mask must drop exactly those 8 tokens (with one of them kept the M2 would
    be at least 4 / (n - 7) > 0.04, as n <= 32)."""
    shifted = copy.deepcopy(groups)
    for g in shifted:
        for s in g.samples:
            s.logp_mu = [s.logp_mu[0] - 2.0, *s.logp_mu[1:]]
    calls: list[tuple[int, float]] = []

    def spy(logp_old: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, threshold: float) -> Any:
        calls.append((mask.shape[0], threshold))
        return m2po_mask(logp_old, logp_mu, mask, threshold)

    monkeypatch.setattr(actor_module, "m2po_mask", spy)
    cfg = config("algorithm.minibatches=2", "algorithm.loss.trust_region.type=m2po")
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(preset))
    m = values(actor.step(shifted).metrics)
    n = sum(len(s.response_ids) for g in groups for s in g.samples)
    assert calls == [(8, 0.04)]  # once per rollout batch, on all 8 rows (2 minibatches, micro-batches of 3)
    assert actor.version == 2 and finite(m) and m["train/loss"] != 0 and m["train/grad_norm"] > 0
    assert m["offpolicy/m2"] == pytest.approx(4 * 8 / n, rel=1e-3)
    assert m["offpolicy/m2_masked_frac"] == pytest.approx(8 / n) and m["offpolicy/m2_kept"] < 1e-6
    e2 = math.exp(2.0)
    assert m["offpolicy/ess"] == pytest.approx((8 * e2 + n - 8) ** 2 / (n * (8 * e2**2 + n - 8)), rel=1e-3)
    assert "train/clip_frac" not in m and m["offpolicy/clipped_token_entropy"] > 0  # the dropped tokens'


# ------------------------------------------------------------------------------------- publishing


def test_publish_loads_into_worker(preset: Path, groups: list[Group]) -> None:
    actor = TrainerActor(TrainerActorConfig.of(config()), str(preset))
    actor.step(groups)
    state, version = actor.snapshot()
    assert version == actor.version == 1
    worker = RolloutWorker(WorkerConfig.of(config()), str(preset))
    trained = dict(actor.trainer.module.named_parameters())
    before = dict(worker.engine.model.named_parameters())
    assert not all(torch.equal(before[k], trained[k]) for k in trained)  # the step moved the weights

    assert worker.load_weights((state, version)) == 1 and worker.version == 1
    loaded = dict(worker.engine.model.named_parameters())
    assert loaded.keys() == trained.keys()
    for name, p in trained.items():
        assert torch.equal(loaded[name], p.detach()), name

    bad = copy.copy(state)
    bad["model.norm.weight_typo"] = bad.pop("model.norm.weight")
    with pytest.raises(RuntimeError, match="does not fit the rollout model.*model.norm.weight"):
        worker.load_weights((bad, version + 1))
    assert worker.version == 1


def test_bf16_rollout_gets_bf16_weights_equal_to_its_own_cast(preset: Path, groups: list[Group]) -> None:
    cfg = config("model.dtype=bfloat16")
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(preset))
    actor.step(groups)
    state, version = actor.snapshot()
    masters = actor.trainer.state_dict_for_export()  # fp32
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert sum(t.nbytes for t in state.values()) * 2 == sum(t.nbytes for t in masters.values())
    # A bf16 worker loading the fp32 masters rounds them itself: it ends up with the same bits.
    from_bf16 = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    from_fp32 = RolloutWorker(WorkerConfig.of(cfg), str(preset))
    from_bf16.load_weights((state, version))
    from_fp32.load_weights((masters, version))
    got, want = dict(from_bf16.engine.model.named_parameters()), dict(from_fp32.engine.model.named_parameters())
    assert got.keys() == want.keys() and all(p.dtype == torch.bfloat16 for p in got.values())
    for name, p in want.items():
        assert torch.equal(got[name].view(torch.int16), p.view(torch.int16)), name
    assert not all(torch.equal(masters[k], masters[k].to(torch.bfloat16).float()) for k in masters)  # real rounding
