"""The start-up checks of `tidal train` and `tidal sft`, in one place.

Each stage runs them before it starts anything, and `tidal check` runs the very same functions
(`check_train`, or `check_sft` with `--stage sft`): a config the check accepts is not refused by its
stage, one it refuses gets the stage's one line. They read the config, the plugins it names, the
policy's model config (never its weights), the tokenizer, the data and the run directory's
checkpoints; they start no actor or engine and write no file.

Every generation must fit the model's positions (`max_position_embeddings`, or vLLM's
`max_model_len`): a longer one runs past the position embeddings and produces garbage, silently.
The limits alone are checked against the model config, each prompt with its limit against the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tidal import checkpoint
from tidal.config import ConfigError, DataConfig, ModelConfig, RewardsConfig, RolloutConfig, RunConfig, load_config
from tidal.data import Room, check_prompt_lengths, load_splits
from tidal.envs.agent import AgentEnv
from tidal.envs.base import Env
from tidal.envs.loading import env_label, resolve_envs
from tidal.model.loading import build_char_tokenizer, load_tokenizer, preset_config, tokenizer_dir, warm_start_dir
from tidal.model.memory import Plan
from tidal.rewards import resolve_rewards
from tidal.runtime import absolute_plugin_paths
from tidal.types import Prompt

Sources = dict[str, tuple[Dataset, float]]
"""Each env's train split and sampling weight, by env label."""

# ---------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class TrainStart:
    """What `tidal train` starts from, once every start-up check passed."""

    cfg: RunConfig
    """The config as the run goes on: RL defaults filled in, on a resume the lr schedule's length kept."""
    resumed: dict[str, Any] | None
    """With `train.resume`, the newest checkpoint's driver state (its directory under "path")."""
    sources: Sources
    held_out: list[Prompt]
    """The held-out prompts of every env."""
    plan: Plan
    """The memory plan (`tidal plan`), checked against the memory this node has."""


@dataclass(frozen=True)
class SFTStart:
    """What `tidal sft` starts from, once every start-up check passed."""

    cfg: RunConfig
    """The config with SFT defaults filled in."""
    tokenizer: PreTrainedTokenizerBase
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]


def check_train(cfg: RunConfig, fit: bool = True) -> TrainStart:
    """`cfg` through every check `tidal train` makes before it starts anything: the RL rules of the
    config (`RunConfig.for_rl`), the plugins, vLLM when named, the token limits against the model's
    positions, the run directory's checkpoints, an SFT warm start that is still to train (by the rules
    of `tidal sft`), every prompt of the data, then (`fit`) the memory plan against this node's
    memory (`tidal plan`). Plugin file paths come back absolute (actors may
    not share this process's working directory)."""
    from tidal.stages.plan import check_fits, plan_run

    cfg = absolute_plugin_paths(cfg.for_rl())
    envs = resolve_plugins(cfg)
    positions = position_limit(cfg.model, cfg.rollout)
    rooms = generation_rooms(cfg, positions, [env.multi_turn or env.agent for env in envs.values()])
    cfg, resumed = checkpoint.resume_point(cfg)
    warm = cfg.model.sft_warm_start
    if warm is not None and not (warm_start_dir(warm) / "summary.json").is_file():
        check_sft(load_config(warm))  # `tidal train` trains it first
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    check_teacher(cfg, tokenizer)
    sources, held_out, longest = load_env_splits(cfg, tokenizer, rooms=rooms)
    plan = plan_run(cfg, longest, any(env.multi_turn or env.agent for env in envs.values()))
    if fit:
        check_fits(plan, cfg)
    return TrainStart(cfg, resumed, sources, held_out, plan)


def check_sft(cfg: RunConfig) -> SFTStart:
    """`cfg` through every check `tidal sft` makes before it trains: its rewards (the held-out
    evaluation's), its data, and the evaluation's token limit against the model's positions."""
    cfg = cfg.for_sft()
    resolve_rewards(cfg.rewards)
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    train_ds, eval_ds = load_splits(cfg.data)
    train_rows, eval_rows = train_ds.to_list(), eval_ds.to_list() if eval_ds is not None else []
    room = None
    # The only generation of SFT: greedy answers to the held-out rows, with the transformers engine.
    if eval_rows and (positions := position_limit(cfg.model, None)) is not None:
        room = _eval_room(cfg, positions)
    check_prompt_lengths(tokenizer, [r["prompt"] for r in train_rows], cfg.data, "train")
    check_prompt_lengths(tokenizer, [r["prompt"] for r in eval_rows], cfg.data, "eval", room)
    return SFTStart(cfg, tokenizer, train_rows, eval_rows)


# ------------------------------------------------------------------------------------------- teacher


def check_teacher(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A distillation teacher (`algorithm.distill.teacher`) scores the policy's own token ids, so it
    needs the policy's `tokenizer`: every token at the same id, the same end-of-sequence token, and
    logits over as many ids (`vocab_size`). Read from the teacher's tokenizer and config alone (an SFT
    teacher not trained yet: its base model's, and its SFT run through `check_sft`); a mismatch is
    refused in one line."""
    distill = cfg.algorithm.distill
    if distill is None:
        return
    teacher = distill.teacher_model()
    warm = teacher.sft_warm_start
    if warm is not None and not (warm_start_dir(warm) / "summary.json").is_file():
        check_sft(load_config(warm))  # `tidal train` trains it first
    key = f"algorithm.distill.teacher {distill.teacher!r}"
    teacher_tokenizer = load_tokenizer(tokenizer_dir(teacher))
    theirs, ours = teacher_tokenizer.get_vocab(), tokenizer.get_vocab()
    differ = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    if differ:
        t = differ[0]
        raise ConfigError(
            f"{key} has another tokenizer than the policy: {len(differ)} tokens have other ids or are missing "
            f"(e.g. {t!r}: policy {ours.get(t)}, teacher {theirs.get(t)}); the teacher scores the policy's "
            "token ids, so distil from a teacher with the policy's tokenizer"
        )
    eos = teacher_tokenizer.eos_token_id
    if eos != tokenizer.eos_token_id:
        raise ConfigError(
            f"{key} ends sequences with token {eos}, the policy with {tokenizer.eos_token_id}; the teacher "
            "would score the policy's end of sequence as an ordinary token"
        )
    vocab = _config_value(model_config(teacher), "vocab_size")
    own = _config_value(model_config(cfg.model), "vocab_size")
    if vocab != own:
        raise ConfigError(
            f"{key} has vocab_size {vocab} and the policy {own}: their logits are over different ids; "
            "distil from a teacher with the policy's vocabulary"
        )


# ------------------------------------------------------------------------------------------- plugins


def resolve_plugins(cfg: RunConfig) -> dict[str, Env]:
    """Fail fast on a bad plugin path or kwarg, or a missing vLLM; the envs by label (one unnamed
    `Env` without `envs`)."""
    if not cfg.envs:
        resolve_rewards(cfg.rewards)
        envs = {"": Env()}
    else:
        envs = resolve_envs(cfg.envs)
        if cfg.rollout.record_routing and any(env.multi_turn or env.agent for env in envs.values()):
            raise ConfigError(
                "rollout.record_routing works with single-turn envs for now (a multi-turn or agent "
                "episode's turns would need their routing stitched together)"
            )
        for spec in cfg.envs:
            resolve_rewards(RewardsConfig(functions=spec.rewards))
    if cfg.rollout.engine == "vllm":
        from tidal.rollout.engines.vllm import require_vllm

        require_vllm()
    return envs


# ---------------------------------------------------------------------------------------------- data


def load_env_splits(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, check_train: bool = True, rooms: dict[str, Room] | None = None
) -> tuple[Sources, list[Prompt], int]:
    """Every env's train split with its weight, by label, the held-out prompts of every env, and the
    longest prompt's tokens (the memory plan's rows are that plus the completion). A
    prompt over `data.max_prompt_tokens`, or with `rooms` (by split, "train" and "eval") too long for
    its single-turn completion, fails here with its file and row, before any actor starts;
    `check_train=False` checks the held-out split only (`tidal eval`, which uses nothing else)."""
    envs = resolve_envs(cfg.envs) if cfg.envs else {"": Env()}
    specs = [(env_label(spec), spec.weight, spec.data or cfg.data) for spec in cfg.envs] or [("", 1.0, cfg.data)]
    sources, held_out, longest = {}, [], 0
    for label, weight, data in specs:
        train_ds, eval_ds = _env_splits(envs[label], data)
        eval_rows = eval_ds.to_list() if eval_ds is not None else []
        train_rows = train_ds.to_list() if check_train else []
        # A multi-turn episode ends at rollout.max_context_tokens, which the config check holds to the positions.
        env_rooms = {} if envs[label].multi_turn else rooms or {}
        for split, rows in (("train", train_rows), ("eval", eval_rows)):
            texts = [_prompt_text(envs[label], row) for row in rows]
            longest = max(longest, check_prompt_lengths(tokenizer, texts, data, split, env_rooms.get(split)))
        sources[label] = (train_ds, weight)
        held_out += [Prompt(-1, row, label) for row in eval_rows]
    return sources, held_out, longest


def _env_splits(env: Env, data: DataConfig) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) of an env: its own rows where it brings them (an agent's `splits()`, a
    verifiers environment's dataset), else its data section's."""
    own = env.splits() if isinstance(env, AgentEnv) else None
    if own is None:
        return load_splits(data)
    train, held = own
    return Dataset.from_list(train), Dataset.from_list(held) if held else None


def _prompt_text(env: Env, row: dict[str, Any]) -> str:
    try:
        return env.prompt(row)
    except Exception:  # the user's env: at run time its group is skipped and logged
        return ""


# ----------------------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class Positions:
    """How many positions a generation may use, and what sets that limit (for the error line)."""

    n: int
    limit: str
    """e.g. "the model's max_position_embeddings" or "rollout.vllm.max_model_len"."""


def position_limit(model: ModelConfig, rollout: RolloutConfig | None) -> Positions | None:
    """The positions of generation with the policy: its config's `max_position_embeddings`, or with
    `rollout` on the vllm engine a `rollout.vllm.max_model_len` (at most the former). None when the
    model's config names no limit."""
    n = model_positions(model)
    vllm = rollout.vllm.max_model_len if rollout is not None and rollout.engine == "vllm" else None
    if vllm is not None and n is not None and vllm > n:
        raise ConfigError(
            f"rollout.vllm.max_model_len={vllm} is more than the model's max_position_embeddings={n}; "
            "lower it, or leave it unset (vLLM then takes the model's)"
        )
    if vllm is not None:
        return Positions(vllm, "rollout.vllm.max_model_len")
    return Positions(n, "the model's max_position_embeddings") if n is not None else None


def model_positions(model: ModelConfig) -> int | None:
    """`max_position_embeddings` of the policy, read from its config alone (`model_config`)."""
    return _config_value(model_config(model), "max_position_embeddings")


def model_config(model: ModelConfig) -> dict[str, Any]:
    """The config of a model section, read without its weights: a preset's, a model directory's
    config.json, an SFT warm start's (its cached checkpoint, else its base model's)."""
    if model.sft_warm_start is not None:
        cached = warm_start_dir(model.sft_warm_start) / "checkpoint" / "config.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        return model_config(load_config(model.sft_warm_start).model)
    if model.preset is not None:
        return preset_config(model.preset, build_char_tokenizer()).to_dict()
    assert model.path is not None
    file = Path(model.path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.path {model.path!r} has no config.json; point it at a save_pretrained folder")
    return json.loads(file.read_text())


def _config_value(config: dict[str, Any], key: str) -> Any:
    """`key` of a model config, or of its `text_config` (multimodal models keep the language model's there)."""
    return config.get(key) or config.get("text_config", {}).get(key)


def generation_rooms(cfg: RunConfig, positions: Positions | None, multi_turn: list[bool]) -> dict[str, Room]:
    """The room a prompt of each split ("train", "eval") leaves for what `tidal train` generates after
    it, once each limit alone is known to fit: `rollout.max_new_tokens` (and the evaluation's) for
    single-turn envs, `rollout.max_context_tokens` for multi-turn ones (`multi_turn`: one per env)."""
    if positions is None:
        return {}
    r = cfg.rollout
    if any(multi_turn) and r.max_context_tokens > positions.n:
        raise ConfigError(
            f"rollout.max_context_tokens={r.max_context_tokens} is more than {positions.limit}="
            f"{positions.n}, and a multi-turn episode grows to it; lower it"
        )
    if all(multi_turn):
        return {}
    train = _fits(Room(r.max_new_tokens, "rollout.max_new_tokens", positions.n, positions.limit))
    return {"train": train, "eval": _eval_room(cfg, positions)}


def _eval_room(cfg: RunConfig, positions: Positions) -> Room:
    """The held-out evaluation's room: `eval.max_new_tokens`, or `rollout.max_new_tokens` when unset."""
    if cfg.eval.max_new_tokens is not None:
        return _fits(Room(cfg.eval.max_new_tokens, "eval.max_new_tokens", positions.n, positions.limit))
    room = Room(cfg.rollout.max_new_tokens, "rollout.max_new_tokens", positions.n, positions.limit)
    return _fits(room, " (eval.max_new_tokens unset)")


def _fits(room: Room, note: str = "") -> Room:
    """`room`, once its generation leaves at least one position for a prompt."""
    if room.new_tokens >= room.positions:
        raise ConfigError(
            f"{room.key}={room.new_tokens}{note} leaves no room for a prompt within {room.limit}="
            f"{room.positions} (a prompt and its completion share them); lower {room.key}"
        )
    return room
