"""A worker's environments at run time: prompts in, generated and scored samples out.

Each env of the run (or, without `envs`, the run's data scored by `rewards.functions`) becomes an
`EnvRuntime`: the env instance, the reward scorer of its score and extra rewards, and its data
config (chat template, prompt length limit). `generate_samples` produces a group of completions
per prompt, single-turn through the engine directly, multi-turn through episodes; `score_samples`
scores them and returns the `reward/`, `rollout/` and per-env `env/<label>/` metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from tidal.config import DataConfig, RewardsConfig, RunConfig
from tidal.data import encode_texts
from tidal.envs.base import Env, MultiTurnEnv
from tidal.envs.episodes import Episode, run_episodes
from tidal.envs.loading import resolve_envs
from tidal.rewards import RewardScorer, resolve_rewards
from tidal.rewards.scoring import FAILURE_KINDS, reward_metrics
from tidal.rollout.engine import Engine
from tidal.types import Completion, Prompt, Sample, SamplingParams

log = logging.getLogger(__name__)


class DataEnv(Env):
    """The run's `data` as an env: prompts as they are; scored by `rewards.functions`."""


@dataclass
class EnvRuntime:
    label: str
    env: Env
    scorer: RewardScorer
    data: DataConfig


def build_runtimes(cfg: RunConfig) -> dict[str, EnvRuntime]:
    """One runtime per env label ("" for the run's data without `envs`)."""
    if not cfg.envs:
        return {"": EnvRuntime("", DataEnv(), RewardScorer(cfg.rewards), cfg.data)}
    out = {}
    for spec, (label, env) in zip(cfg.envs, resolve_envs(cfg.envs).items(), strict=True):
        extra = resolve_rewards(RewardsConfig(functions=spec.rewards)) if spec.rewards else []
        rewards = [(label, env.score, {}, 1.0)]
        rewards += [(name, fn, kw, s.weight) for (name, fn, kw), s in zip(extra, spec.rewards, strict=True)]
        out[label] = EnvRuntime(label, env, RewardScorer(cfg.rewards, rewards=rewards), spec.data or cfg.data)
    return out


def to_sample(c: Completion, prompt: Prompt) -> Sample:
    return Sample(
        group_id=prompt.group_id, prompt_ids=c.prompt_ids, response_ids=c.token_ids, loss_mask=[1] * len(c.token_ids),
        logp_mu=c.logprobs, finish_reason=c.finish_reason, version=c.version,
        versions=c.versions or [c.version] * len(c.token_ids), text=c.text, row=prompt.row, env=prompt.env,
    )  # fmt: skip


def episode_sample(e: Episode, prompt: Prompt, engine: Engine) -> Sample:
    return Sample(
        group_id=prompt.group_id, prompt_ids=e.prompt_ids, response_ids=e.response_ids, loss_mask=e.loss_mask,
        logp_mu=e.logp_mu, finish_reason=e.finish_reason, version=min(e.versions, default=engine.version),
        versions=e.versions, text=engine.tokenizer.decode(e.response_ids, skip_special_tokens=True),
        row=prompt.row, reward_errors=list(e.errors), env=prompt.env, turns=e.turns, step_rewards=e.step_rewards,
        env_info=e.info,
    )  # fmt: skip


def generate_samples(
    rt: EnvRuntime, engine: Engine, prompts: list[Prompt], n: int, params: Callable[[int], SamplingParams],
    cfg: RunConfig, on_chunk: Callable[[], None] | None = None,
) -> list[Sample]:  # fmt: skip
    """`n` samples per prompt (consecutive), unscored. `params(i)` gives the i-th generate call's
    sampling parameters; `on_chunk` is the engine's hook for interruptible generation. A prompt whose
    env fails to make its text yields no samples (its group is then dropped and counted)."""
    texts, kept = [], []
    for p in prompts:
        try:
            texts.append(rt.env.prompt(p.row))
            kept.append(p)
        except Exception as e:  # the user's env: contained, the group is left empty
            log.warning("env %r could not make a prompt of a row (%s); its group is skipped", rt.label, e)
    ids = encode_texts(engine.tokenizer, texts, rt.data)
    stop = list(dict.fromkeys([*cfg.rollout.stop, *rt.env.stop]))
    kwargs = {"on_chunk": on_chunk, "chunk_tokens": cfg.rollout.chunk_tokens}
    flat = [(p, x) for p, x in zip(kept, ids, strict=True) for _ in range(n)]
    bs = cfg.rollout.batch_size
    if rt.env.multi_turn:
        env = rt.env
        assert isinstance(env, MultiTurnEnv)
        episodes = []
        for (_, x), state in zip(flat, rt.scorer.run_calls([partial(env.reset, p.row) for p, _ in flat]), strict=True):
            ep = Episode(x, state.value)
            if not state.ok:
                ep.errors.append(f"reset: {state.reason}")
                ep.done = True
            episodes.append(ep)
        run_episodes(env, episodes, engine, lambda turn: _with_stop(params(turn), stop), rt.scorer.run_calls,
                     cfg.rollout.max_context_tokens, bs, kwargs)  # fmt: skip
        return [episode_sample(e, p, engine) for e, (p, _) in zip(episodes, flat, strict=True)]
    samples = []
    for i, start in enumerate(range(0, len(flat), bs)):
        chunk = flat[start : start + bs]
        outs = engine.generate([x for _, x in chunk], _with_stop(params(i), stop), **kwargs)  # type: ignore[arg-type]
        samples += [to_sample(c, p) for c, (p, _) in zip(outs, chunk, strict=True)]
    return samples


def _with_stop(p: SamplingParams, stop: list[str]) -> SamplingParams:
    return SamplingParams(**{**vars(p), "stop": stop})


def score_samples(runtimes: dict[str, EnvRuntime], samples: list[Sample]) -> dict[str, float]:
    """Score every sample with its env's scorer; `reward/` metrics over all samples, `rollout/accuracy`
    by each env's `is_correct`, and per env (with `envs`) `env/<label>/...`."""
    failed: Counter[str] = Counter()
    elapsed = 0.0
    correct: list[bool] = []
    by_env: dict[str, list[Sample]] = {}
    for s in samples:
        by_env.setdefault(s.env, []).append(s)
    metrics: dict[str, float] = {}
    for label, group in by_env.items():
        rt = runtimes[label]
        m = rt.scorer.score(group)
        elapsed += m["reward/score_time_s"]
        failed.update({k: int(m[f"reward/failed_{k}"]) for k in FAILURE_KINDS})
        ok = [_is_correct(rt, s) for s in group]
        correct += ok
        if label:
            metrics.update(_env_metrics(label, group, ok))
    metrics.update(reward_metrics(samples, failed, elapsed))
    metrics["rollout/accuracy"] = sum(correct) / len(correct) if correct else 0.0
    return metrics


def _is_correct(rt: EnvRuntime, s: Sample) -> bool:
    try:
        return bool(rt.env.is_correct(s, s.row))
    except Exception as e:  # the user's env: contained, counted as not correct
        log.warning("env %r is_correct raised %s; counted as not correct", rt.label, e)
        return False


def _env_metrics(label: str, samples: list[Sample], correct: list[bool]) -> dict[str, float]:
    n = max(len(samples), 1)
    out = {
        f"env/{label}/samples": float(len(samples)),
        f"env/{label}/reward_mean": sum(s.reward for s in samples) / n,
        f"env/{label}/accuracy": sum(correct) / n,
        f"env/{label}/response_length": sum(len(s.response_ids) for s in samples) / n,
        f"env/{label}/turns_mean": sum(s.turns for s in samples) / n,
        f"env/{label}/failed_samples": float(sum(bool(s.reward_errors) for s in samples)),
    }
    keys = dict.fromkeys(k for s in samples for k in s.env_info)
    for k in keys:
        vals = [s.env_info[k] for s in samples if k in s.env_info]
        out[f"env/{label}/{k}"] = sum(vals) / len(vals)
    return out


def eval_metrics(runtimes: dict[str, EnvRuntime], samples: list[Sample]) -> dict[str, float]:
    """Held-out metrics of greedy samples (one per row) with `envs`: accuracy and reward per env and overall."""
    m = score_samples(runtimes, samples)
    out = {"eval/accuracy": m["rollout/accuracy"], "eval/reward_mean": m["reward/mean"],
           "eval/num_samples": float(len(samples))}  # fmt: skip
    for key, v in m.items():
        if key.startswith("env/") and key.endswith(("/accuracy", "/reward_mean", "/response_length", "/turns_mean")):
            out["eval/" + key.removeprefix("env/")] = v
    return out


def group_by_env(prompts: list[Prompt]) -> dict[str, list[Prompt]]:
    out: dict[str, list[Prompt]] = {}
    for p in prompts:
        out.setdefault(p.env, []).append(p)
    return out

