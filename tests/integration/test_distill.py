"""On-policy distillation through the real trainer actor and rollout worker, in-process on CPU: a
teacher equal to the student gives no signal on-policy, the teacher's log-probs are those of a
plain forward, and a short on-policy run from a random student toward a sharper teacher brings the
per-token reverse KL down."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tidal.trainer.actor as actor_module
from tidal.config import RunConfig, load_config
from tidal.model.forward import batch_logprobs
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.worker import RolloutWorker, WorkerConfig
from tidal.telemetry.metrics import values
from tidal.trainer.actor import TrainerActor, TrainerActorConfig
from tidal.trainer.rl import build_batch
from tidal.types import Group, Prompt

pytestmark = pytest.mark.integration

OVERRIDES = [
    "model.preset=tiny-qwen3-moe",
    "rollout.group_size=4",
    "rollout.max_new_tokens=6",
    "rollout.temperature=1.0",
    "trainer.micro_batch_size=16",
    "monitor.wandb=disabled",
]


@pytest.fixture(scope="module")
def student() -> Iterator[Path]:
    threads = torch.get_num_threads()
    yield materialize_preset("tiny-qwen3-moe", seed=0)
    torch.set_num_threads(threads)  # the worker and the actor set one thread


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random tiny-qwen3-moe (init seed 1) with its output layer scaled up 5 times: a more
    peaked distribution than the near-uniform random student's (reverse KL about 0.6 nat per token)."""
    model = load_model(materialize_preset("tiny-qwen3-moe", seed=1))
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    load_tokenizer(materialize_preset("tiny-qwen3-moe", seed=1)).save_pretrained(out)
    return out


def config(teacher: Path, *extra: str) -> RunConfig:
    return load_config(None, [*OVERRIDES, f"algorithm.distill.teacher={teacher}", *extra])


def prompts(n: int, seed: int, first_id: int) -> list[Prompt]:
    rng = random.Random(seed)
    rows = [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]
    return [Prompt(first_id + i, {"prompt": f"{a}+{b}=", "answer": str(a + b)}) for i, (a, b) in enumerate(rows)]


def test_a_teacher_equal_to_the_student_gives_no_signal_on_policy(
    student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On-policy (version-0 samples, trainer at version 0) a teacher with the student's weights scores
    each sampled token as the rollout did: the teacher's term of every advantage is 0 up to the
    engines' numerics, and with distillation alone (reward_coef 0) nothing moves the weights."""
    seen: list[Any] = []
    original = actor_module.distill_advantages

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(actor_module, "distill_advantages", spy)
    cfg = config(student, "algorithm.distill.reward_coef=0", "trainer.lr=1e-3")
    groups = RolloutWorker(WorkerConfig.of(cfg), str(student)).rollout(prompts(4, 0, 0), seed=0).groups
    for g in groups:  # rewards with variance: a reward term would show if reward_coef were ignored
        for j, s in enumerate(g.samples):
            s.reward = float(j % 2)
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(student))
    m = values(actor.step(groups).metrics)
    (args,) = seen
    reward_adv, logp_teacher, logp_mu, mask = args[:4]
    assert float(reward_adv.abs().max()) > 0.5  # the reward's advantage was there, and weighed 0
    valid = mask.bool()
    assert float((logp_teacher - logp_mu)[valid].abs().max()) < 1e-4
    assert abs(m["distill/reverse_kl"]) < 1e-5 and m["distill/teacher_logp"] < -1.0
    assert m["train/grad_norm"] < 1e-3  # advantages of ~1e-6: no step to speak of
    assert m["perf/teacher_time_s"] > 0


def test_distillation_brings_the_reverse_kl_down(student: Path, sharp_teacher: Path) -> None:
    """Synchronous on-policy distillation alone (reward_coef 0; the arithmetic reward of a random
    student is 0 anyway): each step the worker samples with the newest weights, the trainer scores the
    tokens with the teacher and steps. The teacher's log-probs of the first batch are those of a
    plain forward of the teacher, and the per-token reverse KL falls: 0.61 -> 0.39 (mean of the first
    and the last 4 steps of 20, 2026-12, about 12 s). The estimator has no baseline, so a step needs
    many tokens (16 prompts x 8 samples) for the fall to stand out of the noise."""
    overrides = ["algorithm.distill.reward_coef=0", "trainer.lr=3e-3", "rollout.max_staleness=0"]
    cfg = config(sharp_teacher, *overrides, "rollout.group_size=8", "trainer.micro_batch_size=64")
    worker = RolloutWorker(WorkerConfig.of(cfg), str(student))
    actor = TrainerActor(TrainerActorConfig.of(cfg), str(student))
    teacher = load_model(sharp_teacher)
    kl = []
    for step in range(20):
        groups: list[Group] = worker.rollout(prompts(16, step, 16 * step), seed=step).groups
        if step == 0:
            batch, _ = build_batch(groups, "grpo", actor.tokenizer.pad_token_id)
            want = batch_logprobs(teacher, batch, 1.0, 64)[batch.loss_mask.bool()].mean()
        m = values(actor.step(groups).metrics)
        if step == 0:
            assert m["distill/teacher_logp"] == pytest.approx(float(want), abs=1e-4)
        kl.append(m["distill/reverse_kl"])
        worker.load_weights(actor.snapshot())
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert first > 0.3 and last < 0.8 * first, kl
