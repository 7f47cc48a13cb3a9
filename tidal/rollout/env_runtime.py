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
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from tidal.config import DataConfig, EnvSpec, RewardsConfig, RolloutConfig
from tidal.data import encode_texts
from tidal.envs.agent import AgentEnv
from tidal.envs.base import Env, MultiTurnEnv
from tidal.envs.loading import resolve_envs
from tidal.plugins import PluginRef, call_plugin, is_async, plugin_ref, pool_call
from tidal.rewards import RewardScorer, resolve_rewards
from tidal.rewards.scoring import FAILURE_KINDS, reward_metrics
from tidal.rollout.agents import AgentServer
from tidal.rollout.endpoint import Serving
from tidal.rollout.engines.base import Engine
from tidal.rollout.episodes import Episode, episode_sample, run_episodes
from tidal.telemetry.metrics import Metrics, mean, total
from tidal.types import Completion, Prompt, Sample, SamplingParams

log = logging.getLogger(__name__)


class DataEnv(Env):
    """The run's `data` as an env: prompts as they are, scored by `rewards.functions`; a sample is
    correct when its reward reaches `rewards.correct_threshold`."""

    def __init__(self, correct_threshold: float = 1.0) -> None:
        self.correct_threshold = correct_threshold

    def is_correct(self, sample: Sample, row: dict[str, Any]) -> bool:
        return sample.reward >= self.correct_threshold


@dataclass
class EnvRuntime:
    label: str
    env: Env
    scorer: RewardScorer
    data: DataConfig
    ref: PluginRef | None = None
    """With `isolation: process`, how a pool process builds the env: its sync calls run there."""
    agents: AgentServer | None = None
    """An agent env's: the worker's endpoint its agents call (`attach_agents`)."""

    def method(self, name: str) -> Callable[..., Any]:
        """The env's `reset` or `step` as the worker calls it: the env's own, or (isolated, sync) an
        async call into a pool process, killed at the timeout, whose changes to `step`'s state are
        copied back into the caller's."""
        own = getattr(self.env, name)
        if self.ref is None or is_async(own):
            return own
        self.scorer.calls.start_pool(call_plugin.__module__)
        return partial(pool_call, self.scorer.calls, replace(self.ref, method=name), name == "step")


def build_runtimes(envs: list[EnvSpec], rewards: RewardsConfig, data: DataConfig) -> dict[str, EnvRuntime]:
    """One runtime per env label ("" for the run's `data` scored by `rewards.functions` without `envs`)."""
    if not envs:
        return {"": EnvRuntime("", DataEnv(rewards.correct_threshold), RewardScorer(rewards), data)}
    out = {}
    for spec, (label, env) in zip(envs, resolve_envs(envs).items(), strict=True):
        ref = plugin_ref(type(env), spec.kwargs) if spec.isolation == "process" else None
        extra = resolve_rewards(RewardsConfig(functions=spec.rewards)) if spec.rewards else []
        scored = [(label, env.score, {}, 1.0)]
        scored += [(name, fn, kw, s.weight) for (name, fn, kw), s in zip(extra, spec.rewards, strict=True)]
        score = replace(ref, method="score") if ref is not None and not is_async(env.score) else None
        scorer = RewardScorer(rewards, rewards=scored, refs=[score] + [None] * len(extra))
        out[label] = EnvRuntime(label, env, scorer, spec.data or data, ref)
    return out


def attach_agents(
    runtimes: dict[str, EnvRuntime], engine: Engine, rollout: RolloutConfig, model_name: str, index: int = 0
) -> AgentServer | None:
    """Start the worker's agent endpoint over `engine` when an env is an agent, and hand it to them."""
    agent_rts = [rt for rt in runtimes.values() if rt.env.agent]
    if not agent_rts:
        return None
    server = AgentServer(
        engine, rollout.endpoint, model_name, rollout.max_new_tokens, rollout.max_context_tokens, index
    )
    for rt in agent_rts:
        rt.agents = server
    return server


def to_sample(c: Completion, prompt: Prompt) -> Sample:
    return Sample(
        group_id=prompt.group_id,
        prompt_ids=c.prompt_ids,
        response_ids=c.token_ids,
        loss_mask=[1] * len(c.token_ids),
        logp_mu=c.logprobs,
        finish_reason=c.finish_reason,
        version=c.version,
        versions=c.versions or [c.version] * len(c.token_ids),
        text=c.text,
        row=prompt.row,
        env=prompt.env,
        routing=c.routing,
    )


def generate_samples(
    rt: EnvRuntime,
    engine: Engine,
    prompts: list[Prompt],
    n: int,
    params: SamplingParams,
    rollout: RolloutConfig,
    between_generations: Callable[[], None] | None = None,
    on_chunk: Callable[[], None] | None = None,
    on_sample: Callable[[Sample], None] | None = None,
    admit: Callable[[int], list[Prompt]] | None = None,
) -> list[Sample]:
    """`n` samples per prompt (consecutive), unscored.

    Generate call i (a chunk of `rollout.batch_size` sequences, or a multi-turn episode's turn) samples
    with `params.seeded(i)`. `between_generations` is called before each generate call
    (the worker applies newly arrived weights there); `on_chunk` is the engine's hook for interruptible
    generation. `on_sample` is called with each sample as soon as it ends (single-turn: the step its
    last token is sampled; multi-turn: when the episodes end). `admit(running_rows)` (single-turn
    continuous batching) returns more prompts, whose `n` rows join the running generate call at a
    chunk boundary; their samples come through `on_sample` and in the returned list. A prompt whose
    env fails to make its text yields no samples (its group is then dropped and counted).
    """
    params = replace(params, stop=list(dict.fromkeys([*rollout.stop, *rt.env.stop])))
    if rt.env.agent:
        return _delivered(_agent_samples(rt, prompts, n, params, rollout, between_generations, on_chunk), on_sample)
    kept, ids = _encode(rt, engine, prompts)
    kwargs = {"on_chunk": on_chunk, "chunk_tokens": rollout.chunk_tokens}
    if rollout.record_routing:  # the transformers engine's (the config refuses it with vLLM)
        kwargs["record_routing"] = True
    flat = [(p, x) for p, x in zip(kept, ids, strict=True) for _ in range(n)]
    bs = rollout.batch_size
    if rt.env.multi_turn:
        return _delivered(_episodes(rt, engine, flat, params, rollout, kwargs, between_generations), on_sample)
    samples = []
    for i, start in enumerate(range(0, len(flat), bs)):
        chunk = flat[start : start + bs]
        if between_generations is not None:
            between_generations()
        ended: dict[int, Sample] = {}
        if admit is not None:

            def join(running: int, chunk: list = chunk) -> list[tuple[list[int], int]]:
                new = list(zip(*_encode(rt, engine, admit(running)), strict=True))
                chunk += [(p, x) for p, x in new for _ in range(n)]
                return [(x, row_limit(p, params)) for p, x in new for _ in range(n)]

            kwargs["admit"] = join
        if on_sample is not None:

            def finish(j: int, c: Completion, chunk: list = chunk, ended: dict[int, Sample] = ended) -> None:
                ended[j] = to_sample(c, chunk[j][0])
                on_sample(ended[j])

            kwargs["on_finish"] = finish
        limits = [row_limit(p, params) for p, _ in chunk]
        outs = engine.generate([x for _, x in chunk], params.seeded(i), max_tokens=limits, **kwargs)  # type: ignore[arg-type]
        samples += [ended.get(j) or to_sample(c, p) for j, (c, (p, _)) in enumerate(zip(outs, chunk, strict=True))]
    return samples


def _delivered(samples: list[Sample], on_sample: Callable[[Sample], None] | None) -> list[Sample]:
    """`samples`, each also handed to `on_sample`: episodes (multi-turn, agents) end together."""
    for s in samples if on_sample is not None else []:
        on_sample(s)
    return samples


def _agent_samples(
    rt: EnvRuntime,
    prompts: list[Prompt],
    n: int,
    params: SamplingParams,
    rollout: RolloutConfig,
    between_generations: Callable[[], None] | None,
    on_chunk: Callable[[], None] | None,
) -> list[Sample]:
    """An agent env's samples: `n` episodes per prompt, the agents calling the engine through the
    worker's endpoint while this thread serves it (`AgentServer.run_agents`)."""
    if rt.agents is None:
        raise RuntimeError(f"env {rt.label!r} is an agent, and no endpoint was attached (attach_agents)")
    assert isinstance(rt.env, AgentEnv)
    how = Serving(params, rollout.batch_size, rollout.chunk_tokens, between_generations, on_chunk)
    flat = [p for p in prompts for _ in range(n)]
    return rt.agents.run_agents(rt.env, flat, how, rt.scorer.cfg.timeout_s)


def _episodes(
    rt: EnvRuntime,
    engine: Engine,
    flat: list[tuple[Prompt, list[int]]],
    params: SamplingParams,
    rollout: RolloutConfig,
    kwargs: dict[str, Any],
    between_generations: Callable[[], None] | None,
) -> list[Sample]:
    """A multi-turn env's samples: one episode per row of `flat`, reset in the env's bounded calls
    (a reset that fails ends its episode at once, with the error recorded), then run together."""
    env = rt.env
    assert isinstance(env, MultiTurnEnv)
    episodes = []
    reset = rt.method("reset")
    for (_, x), state in zip(flat, rt.scorer.calls.run([partial(reset, p.row) for p, _ in flat]), strict=True):
        ep = Episode(x, state.value)
        if not state.ok:
            ep.errors.append(f"reset: {state.reason}")
            ep.done = True
        episodes.append(ep)
    run_episodes(
        env,
        rt.method("step"),
        episodes,
        engine,
        params,
        rt.scorer.calls.run,
        rollout.max_context_tokens,
        rollout.batch_size,
        kwargs,
        between_generations,
    )
    return [episode_sample(e, p, engine) for e, (p, _) in zip(episodes, flat, strict=True)]


def row_limit(p: Prompt, params: SamplingParams) -> int:
    """A prompt's cap on new tokens: its row's `max_new_tokens` field, within `rollout.max_new_tokens`."""
    own = p.row.get("max_new_tokens")
    return params.max_new_tokens if own is None else max(1, min(int(own), params.max_new_tokens))


def _encode(rt: EnvRuntime, engine: Engine, prompts: list[Prompt]) -> tuple[list[Prompt], list[list[int]]]:
    """The prompts whose env made a text, and their token ids."""
    texts, kept = [], []
    for p in prompts:
        try:
            texts.append(rt.env.prompt(p.row))
            kept.append(p)
        except Exception as e:  # the user's env: contained, the group is left empty
            log.warning("env %r could not make a prompt of a row (%s); its group is skipped", rt.label, e)
    return kept, encode_texts(engine.tokenizer, texts, rt.data)


def score_samples(runtimes: dict[str, EnvRuntime], samples: list[Sample]) -> Metrics:
    """Score every sample with its env's scorer; `reward/` metrics over all samples, `rollout/accuracy`
    by each env's `is_correct`, and per env (with `envs`) `env/<label>/...`."""
    failed: Counter[str] = Counter()
    elapsed, retried = 0.0, 0
    correct: list[bool] = []
    metrics: Metrics = {}
    for label, group in _by_env(samples).items():
        rt = runtimes[label]
        m = rt.scorer.score(group)
        elapsed += m["reward/score_time_s"].value
        retried += int(m["reward/retried"].value)
        failed.update({k: int(m[f"reward/failed_{k}"].value) for k in FAILURE_KINDS})
        ok = [_is_correct(rt, s) for s in group]
        correct += ok
        if label:
            metrics.update(_env_metrics(f"env/{label}", group, ok))
    metrics.update(reward_metrics(samples, failed, elapsed, retried))
    metrics["rollout/accuracy"] = mean(sum(correct) / len(correct) if correct else 0.0, float(len(correct)))
    return metrics


def _by_env(samples: list[Sample]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.env, []).append(s)
    return out


def _is_correct(rt: EnvRuntime, s: Sample) -> bool:
    try:
        return bool(rt.env.is_correct(s, s.row))
    except Exception as e:  # the user's env: contained, counted as not correct
        log.warning("env %r is_correct raised %s; counted as not correct", rt.label, e)
        return False


def _env_metrics(prefix: str, samples: list[Sample], correct: list[bool]) -> Metrics:
    n = float(len(samples))
    avg = (lambda xs: mean(sum(xs) / n, n)) if samples else (lambda _: mean(0.0, 0.0))
    out = {
        f"{prefix}/samples": total(n),
        f"{prefix}/reward": avg([s.reward for s in samples]),
        f"{prefix}/accuracy": avg([float(c) for c in correct]),
        f"{prefix}/response_length": avg([len(s.response_ids) for s in samples]),
        f"{prefix}/turns_mean": avg([s.turns for s in samples]),
        f"{prefix}/failed_samples": total(float(sum(bool(s.reward_errors) for s in samples))),
    }
    keys = dict.fromkeys(k for s in samples for k in s.env_info)
    for k in keys:
        vals = [s.env_info[k] for s in samples if k in s.env_info]
        out[f"{prefix}/{k}"] = mean(sum(vals) / len(vals), float(len(vals)))
    return out


def eval_metrics(runtimes: dict[str, EnvRuntime], samples: list[Sample]) -> Metrics:
    """Held-out metrics of greedy samples (one per row), scored exactly as in training: `eval/accuracy`
    (each env's `is_correct`), `eval/reward` (mean) and `eval/response_length`, overall and, with
    `envs`, per env under `eval/<label>/`."""
    m = score_samples(runtimes, samples)
    n = float(len(samples))
    out = {
        "eval/accuracy": m["rollout/accuracy"],
        "eval/reward": m["reward/mean"],
        "eval/response_length": mean(sum(len(s.response_ids) for s in samples) / max(n, 1.0), n),
        "eval/num_samples": total(n),
    }
    for key, v in m.items():
        if key.startswith("env/") and not key.endswith(("/samples", "/failed_samples")):
            out["eval/" + key.removeprefix("env/")] = v
    return out


def group_by_env(prompts: list[Prompt]) -> dict[str, list[Prompt]]:
    out: dict[str, list[Prompt]] = {}
    for p in prompts:
        out.setdefault(p.env, []).append(p)
    return out
