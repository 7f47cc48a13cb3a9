"""Typed records that cross stage (and later Ray) boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from tidal.telemetry.metrics import Metrics

if TYPE_CHECKING:  # only annotations: the buffer actor, which holds these records, never imports torch
    import torch

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How one batch is generated. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    """Generate past the end-of-sequence token (benchmarks: every row runs to max_new_tokens)."""

    def seeded(self, i: int) -> SamplingParams:
        """These parameters for the i-th of several generate calls: seed `mix_seed(seed, i)` (None stays None)."""
        return replace(self, seed=None if self.seed is None else mix_seed(self.seed, i))


def mix_seed(seed: int, i: int) -> int:
    """A distinct, reproducible seed for the i-th thing drawn under `seed` (a worker, a batch, a call),
    kept below 2**63 however often seeds are mixed (torch and vLLM take 64-bit seeds)."""
    return (seed * 1_000_003 + i) % 2**63


@dataclass
class Completion:
    """One generated completion of one prompt.

    `logprobs[i]` is the behavior log-prob of `token_ids[i]` under the distribution sampled from
    (log_softmax(logits / temperature) of the raw logits; temperature 1 for greedy decoding), and
    `versions[i]` the policy version of the weights that sampled it.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float]
    version: int = 0
    """The oldest version among the tokens' (the engine's version for an empty completion)."""
    versions: list[int] = field(default_factory=list)
    routing: torch.Tensor | None = None
    """With routing recorded: (tokens fed to the model, MoE layers, top-k) expert indices (uint8, or
    int16 past 256 experts) of the prompt's tokens and then every sampled token but the last
    (never fed back), each from the weights that processed it."""


@dataclass
class TokenBatch:
    """Left- or right-padded token sequences with a mask of the positions that are trained on.

    Every tensor field has the batch dimension first, so a batch splits into micro-batches field
    by field; RL batches extend this with per-token fields (log-probs, advantages) of shape (B, T).
    """

    input_ids: torch.Tensor
    """(B, T) token ids."""
    attention_mask: torch.Tensor
    """(B, T) 1 on real tokens, 0 on padding."""
    loss_mask: torch.Tensor
    """(B, T) 1 where the token at t is a target, predicted from position t - 1 (prompt and
    padding are 0; position 0 is never a target)."""


# ------------------------------------------------------------------------------------------ RL records


@dataclass
class Prompt:
    """One prompt handed to a rollout worker: its dataset row, the env it belongs to, its group id."""

    group_id: int
    """Id of the prompt's group (unique within a run)."""
    row: dict[str, Any]
    """The dataset row (prompt, answer and metadata columns)."""
    env: str = ""
    """Label of the environment the row belongs to ("" without `envs`: the run's data and rewards)."""


@dataclass
class Sample:
    """One completion of one prompt with everything training needs; crosses Ray boundaries.

    Per-token lists (`response_ids`, `loss_mask`, `logp_mu`, `versions`) are aligned with the
    response tokens. `versions[i]` is the policy version that generated token i (all equal unless
    a weight update landed mid-generation).
    """

    group_id: int
    """Id of the prompt's group (unique within a run)."""
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    """1 on response tokens that are trained on (0 e.g. on tool output inside a response)."""
    logp_mu: list[float]
    """Behavior log-probs of the response tokens, at the sampling temperature."""
    finish_reason: FinishReason
    version: int
    """Policy version that generated the sample (the oldest, if tokens span several)."""
    versions: list[int]
    text: str = ""
    """Decoded response."""
    row: dict[str, Any] = field(default_factory=dict)
    """The dataset row of the prompt (prompt, answer and metadata columns)."""
    reward: float = 0.0
    """Weighted sum of the reward functions' scores."""
    scores: dict[str, float] = field(default_factory=dict)
    """Score of each reward function, by name (sub-scores included)."""
    reward_errors: list[str] = field(default_factory=list)
    """One line per reward or env call that failed (raised, timed out, NaN, wrong type)."""
    env: str = ""
    """Label of the sample's environment ("" without `envs`)."""
    turns: int = 1
    """Model turns in the sample (multi-turn envs; their observations sit between the turns)."""
    step_rewards: list[float] = field(default_factory=list)
    """Rewards of a multi-turn episode's steps, in order."""
    env_info: dict[str, float] = field(default_factory=dict)
    """A multi-turn env's `Step.info` values, averaged over the episode."""
    routing: torch.Tensor | None = None
    """With `rollout.record_routing`: the experts generation routed each token fed to the model to
    (see `Completion.routing`)."""
    episode: int = -1
    """An agent episode's index in its group, shared by the samples it was split into (a chat
    template that rewrites history, an agent that edits or forks the conversation): advantages count
    the episode once. -1: the sample is an episode of its own."""
    episode_end: bool = True
    """The last sample of its episode: a group is complete when `group_size` episodes ended."""
    agent_reward: Any = None
    """What an agent env's `run` returned for the episode (its reward), scored by `AgentEnv.score`."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def failed(self) -> bool:
        """A reward or env call failed on this sample."""
        return bool(self.reward_errors)

    def for_training(self) -> TrainSample:
        """The part of the sample the buffer and the trainer use; the row, text and scores stay here."""
        return TrainSample(
            self.group_id,
            self.prompt_ids,
            self.response_ids,
            self.loss_mask,
            self.logp_mu,
            self.finish_reason,
            self.version,
            self.versions,
            self.reward,
            self.failed,
            self.routing,
            self.episode,
        )


@dataclass
class TrainSample:
    """What the buffer's filters and the trainer need of a `Sample`: tokens, masks, behavior
    log-probs, versions and the reward (fields as in `Sample`). This is what crosses Ray to the
    buffer and on to the trainer; a dataset row or decoded text never travels with it."""

    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    logp_mu: list[float]
    finish_reason: FinishReason
    version: int
    versions: list[int]
    reward: float
    failed: bool
    """A reward or env call failed on the sample (`filter.drop_failed_rewards` drops it)."""
    routing: torch.Tensor | None = None
    episode: int = -1


@dataclass
class Group:
    """The completions of one prompt; advantages are computed within a group. A worker's groups hold
    `Sample`s; what it puts into the buffer holds their `TrainSample`s."""

    group_id: int
    samples: list[Sample] | list[TrainSample]
    batch_id: int = -1
    """The rollout batch it was dispatched for (set by the buffer)."""
    worker: int = -1
    """The rollout worker that generated it (set by the buffer)."""

    @property
    def version(self) -> int:
        return min(s.version for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


@dataclass
class TrainBatch(TokenBatch):
    """A right-padded RL batch: prompt + response per row, per-token fields aligned with input_ids.

    Per-token fields (B, T) hold the value for the token at t (0 on prompt and padding), matching
    `loss_mask`: position t - 1's logits give token t's log-prob.
    """

    logp_mu: torch.Tensor = None  # type: ignore[assignment]
    """(B, T) behavior log-probs."""
    advantages: torch.Tensor = None  # type: ignore[assignment]
    """(B, T) advantage of each token (its sequence's advantage)."""
    versions: torch.Tensor = None  # type: ignore[assignment]
    """(B, T) policy version that generated each token."""
    logp_old: torch.Tensor | None = None
    """(B, T) proximal log-probs, recomputed by the trainer before the update."""
    logp_ref: torch.Tensor | None = None
    """(B, T) reference-policy log-probs (when a KL penalty is on)."""
    m2po_keep: torch.Tensor | None = None
    """(B, T) bool, the M2PO trust region's mask over the whole rollout batch: True on the tokens it
    keeps (with `trust_region: m2po`; computed before the batch is split)."""
    routing: torch.Tensor | None = None
    """(B, T, MoE layers, top-k) experts generation routed each token to (`rollout.record_routing`;
    zeros where nothing was recorded: padding and each row's last token)."""


# ---------------------------------------------------------------------------------- actor results


@dataclass
class RolloutResult:
    """What a worker's `rollout` call returns: its groups (empty when they went to the buffer) and metrics."""

    groups: list[Group]
    metrics: Metrics


@dataclass
class StepResult:
    """What one trainer step tells the driver: the policy version after it, and its metrics."""

    version: int
    """Optimizer steps taken so far (unchanged by a skipped step)."""
    trained: bool
    """False when the batch was empty (every group filtered or too stale) and no step was taken."""
    metrics: Metrics
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Each trained group: its id, rollout batch, worker and the policy versions its tokens were
    sampled by (a line of the run's schedule.jsonl)."""


@dataclass
class SyncStats:
    """A worker's receipt of one published snapshot (staged for its generation thread)."""

    version: int
    nbytes: int
    seconds: float
    """Time to receive the snapshot."""


@dataclass(frozen=True)
class CheckpointShard:
    """What one trainer rank reports it wrote into the trainer part of a checkpoint: the files there as
    the rank sees them once every rank has written (names relative to that directory) with their
    sizes, for the driver to find before it seals the checkpoint (`tidal.checkpoint.check_shards`)."""

    rank: int
    files: dict[str, int]
    seconds: float
    """Time the rank took to write."""
