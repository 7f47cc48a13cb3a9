"""The trainer's memory levers (issue 30) on CPU, each against the step it must not change.

Activation checkpointing (`trainer.activation_checkpointing`): each decoder layer is recomputed in the
backward instead of keeping its activations. The step must be the same step, also when the routing
is replayed (R3), where a recompute routed by the routers themselves would take other experts.

Token-budget micro-batches (`trainer.max_tokens_per_micro_batch`): rows grouped by length, each
micro-batch trimmed to its own longest row. The same step as micro-batches of the batch's width, on
one rank or two whose plans differ in length (the shorter runs fillers), and pi_old read back from
the update's forward in the batch's row order.

Log-probs from hidden states (always on): the output layer applied a chunk of tokens at a time, so no
tensor of rows x width x vocabulary exists in a step, forward or backward.

The KL reference: in the training dtype and, at ZeRO-3, partitioned like the policy; the same
log-probs as the whole checkpoint in that dtype.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tidal.model.forward as forward_module
from tidal.config import LossConfig, TrainerConfig
from tidal.model.batching import row_slice
from tidal.model.forward import batch_logprobs, forward
from tidal.model.loading import load_model, materialize_preset
from tidal.model.routing import RoutingRecorder, moe_routers, recorded_positions
from tidal.telemetry.metrics import values
from tidal.trainer.engine import DeepSpeedTrainer
from tidal.trainer.rl import RLLoss
from tidal.types import TrainBatch

pytestmark = pytest.mark.integration

B, T, PROMPT = 4, 24, 8


@pytest.fixture(scope="module")
def preset() -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=0)


def activation_bytes(model: torch.nn.Module) -> tuple[list[int], Any]:
    """A saved-tensor hook counting the bytes autograd keeps for the backward, less the parameters
    (saved by reference, they cost nothing): the activations of a step, whatever the machine."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Looked up at each call: ZeRO-3 gathers a parameter's data into a fresh buffer as it runs.
        params = {p.data.untyped_storage().data_ptr() for p in model.parameters()}
        if t.untyped_storage().data_ptr() not in params:
            saved[0] += t.numel() * t.element_size()
        return t

    return saved, pack


def replayed_batch(model: torch.nn.Module) -> TrainBatch:
    """An RL batch whose recorded routing is random: nothing like what the routers would choose."""
    routers = moe_routers(model)
    layers, top_k, experts = len(routers), routers[0].top_k, routers[0].num_experts
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, model.config.vocab_size, (B, T), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, PROMPT:] = 1
    routing = torch.stack(
        [torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(layers)]) for _ in range(B * T)]
    ).view(B, T, layers, top_k)
    zeros = torch.zeros(ids.shape)
    return TrainBatch(
        ids,
        torch.ones_like(ids),
        mask,
        logp_mu=zeros - 3.0,
        advantages=torch.randn(B, 1, generator=g).expand(B, T).contiguous(),
        versions=zeros.long(),
        routing=routing.to(torch.uint8),
    )


def step(preset: Path, checkpointing: bool, stage: int, replay_in_backward: bool = True) -> dict[str, Any]:
    """One replayed RL step: its metrics, gradients, router calls, the routing recorded meanwhile and
    the bytes autograd saved for the backward (outside the checkpointed layers, which save their own)."""
    model = load_model(preset)
    calls = [0]
    moe_routers(model)[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cfg = TrainerConfig(lr=1e-3, micro_batch_size=2, zero_stage=stage, activation_checkpointing=checkpointing)
    trainer = DeepSpeedTrainer(model, cfg)
    loss = RLLoss(LossConfig(), temperature=1.0, max_len=T, replay=True)
    if replay_in_backward:
        loss_fn, around = loss, partial(loss.around, trainer.module)
    else:  # the replay around the forward alone, as the loss applied it before checkpointing existed

        def loss_fn(engine: Any, micro: TrainBatch, packed: bool) -> Any:
            with loss.around(trainer.module, micro):
                return loss(engine, micro, packed)

        around = None
    saved, pack = activation_bytes(model)

    grads: dict[str, torch.Tensor] = {}
    batch = replayed_batch(model)
    with RoutingRecorder(trainer.module) as recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        metrics = values(trainer.train_step(batch, loss_fn=loss_fn, on_grads=grads.update, around=around))
        routed = recorder.take()
    return {"metrics": metrics, "grads": grads, "calls": calls[0], "routed": routed, "saved": saved[0], "batch": batch}


# ZeRO-3 in the slow tier (and on the GPU: tests/gpu/test_gpu_paths.py::test_memory_levers_on_cuda).
@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_activation_checkpointing_takes_the_same_replayed_step(preset: Path, stage: int) -> None:
    plain, ckpt = step(preset, False, stage), step(preset, True, stage)
    # The recompute ran: each micro-batch's routers were called twice (forward, then backward).
    assert plain["calls"] == 2 and ckpt["calls"] == 4
    # The same step: loss and every gradient. Measured identical to the bit (the recompute repeats the
    # forward's kernels on the same inputs); 1e-6 leaves room for kernels that are not deterministic.
    assert ckpt["metrics"]["loss"] == pytest.approx(plain["metrics"]["loss"], rel=1e-6)
    assert plain["grads"].keys() == ckpt["grads"].keys()
    for name, g in plain["grads"].items():
        assert torch.allclose(ckpt["grads"][name], g, rtol=1e-6, atol=1e-9), name
    # Every replayed token went to its recorded experts, and a recorder saw each routing once (the
    # recompute is not recorded: the bias update counts each token's experts once).
    replayed = recorded_positions(plain["batch"]).flatten()  # every token but each row's last
    assert torch.equal(ckpt["routed"], plain["routed"])
    assert torch.equal(ckpt["routed"][replayed], plain["batch"].routing.flatten(0, 1)[replayed])
    # The activations autograd keeps for the backward: measured 6.6 MB without, 0.5 MB with (the
    # checkpointed layers keep only their inputs, outside this count: 0.4 MB here).
    assert ckpt["saved"] < plain["saved"] / 8


def test_a_recompute_without_the_replay_stops_the_step(preset: Path) -> None:
    """Why the replay spans the backward: the recompute would route by the routers, so the experts'
    tensors differ from those the forward saved, and torch refuses the step."""
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        step(preset, True, 0, replay_in_backward=False)
    assert step(preset, False, 0, replay_in_backward=False)["calls"] == 2  # without checkpointing it runs


# One answer of 44 tokens among short ones: the uneven batch of long chains of thought.
LENGTHS = [12, 9, 48, 7, 10, 6, 11, 8]
WIDTH, PROMPT_LEN = 48, 4


def uneven_batch(vocab: int) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(6, vocab, (len(LENGTHS), WIDTH), generator=g)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        attn[i, :n] = 1
    ids[attn == 0] = 0
    mask = attn.clone()
    mask[:, :PROMPT_LEN] = 0
    logp_mu = torch.where(mask.bool(), -2.0 - torch.rand(ids.shape, generator=g), 0.0)
    advantages = (torch.randn(len(LENGTHS), 1, generator=g) * mask).contiguous()
    return TrainBatch(ids, attn, mask, logp_mu=logp_mu, advantages=advantages, versions=torch.zeros_like(ids))


def budget_step(
    preset: Path,
    budget: int | None,
    stage: int,
    rows: tuple[int, int] = (0, 8),
    micro: int = 4,
    packed: bool = False,
    loss_cfg: LossConfig | None = None,
) -> dict[str, Any]:
    """One RL step on `uneven_batch` (rows [start, end) of it on this rank), pi_old collected from the
    update's forward: metrics, gradients, pi_old in row order, and the bytes saved for the backward."""
    model = load_model(preset)
    cfg = TrainerConfig(
        lr=1e-3, micro_batch_size=micro, zero_stage=stage, max_tokens_per_micro_batch=budget, packing=packed
    )
    trainer = DeepSpeedTrainer(model, cfg)
    batch = row_slice(uneven_batch(model.config.vocab_size), *rows)
    loss = RLLoss(loss_cfg or LossConfig(), temperature=1.0, max_len=WIDTH)
    loss = loss.for_step(replay=False, collect_pi_old=True)
    saved, pack = activation_bytes(model)

    grads: dict[str, torch.Tensor] = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        metrics = values(trainer.train_step(batch, loss_fn=loss, on_grads=grads.update))
    pi_old = loss.take_pi_old(trainer.micros, *batch.input_ids.shape)
    return {"metrics": metrics, "grads": grads, "pi_old": pi_old, "saved": saved[0], "micros": len(trainer.micros)}


def same_step(got: dict[str, Any], want: dict[str, Any]) -> None:
    # Other micro-batches sum the same terms in another order: measured at most 3e-7 relative on the
    # loss and gradients; 1e-5 leaves a margin of 30. A micro-batch's loss normalised by its own
    # tokens (what a budget would break first) moves the gradient by more than 10%.
    assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-5)
    assert got["metrics"]["tokens"] == want["metrics"]["tokens"] == sum(LENGTHS) - len(LENGTHS) * PROMPT_LEN
    for name, g in want["grads"].items():
        assert (got["grads"][name] - g).norm() <= 1e-5 * g.norm() + 1e-12, name


@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_a_token_budget_takes_the_same_step_in_far_less_memory(preset: Path, stage: int) -> None:
    plain, budget = budget_step(preset, None, stage), budget_step(preset, 48, stage)
    same_step(budget, plain)
    # pi_old from the update's own forward, back in the batch's row order, token for token.
    real = uneven_batch(100).loss_mask.bool()
    assert torch.allclose(budget["pi_old"][real], plain["pi_old"][real], atol=1e-5)
    # Two micro-batches of 4 rows x 48 columns (384 cells), against [48], [12, 11, 10, 9] and
    # [8, 7, 6] trimmed (120 cells): the activations autograd keeps follow the cells, measured
    # 27.4 MB against 8.4 MB (0.31; the cells' ratio is 0.31).
    assert (plain["micros"], budget["micros"]) == (2, 3)
    assert budget["saved"] < 0.4 * plain["saved"]


@pytest.mark.parametrize(
    ("name", "stage"),
    [("tiny-qwen3-moe", 0), ("tiny-glm4-moe", 0), pytest.param("tiny-glm4-moe", 3, marks=pytest.mark.slow)],
)
def test_packed_micro_batches_take_the_same_step_without_padding(name: str, stage: int) -> None:
    """`trainer.packing`: each micro-batch's rows run as one sequence of their real tokens. The same
    step as one padded micro-batch of the whole batch, the routers' balance loss included (Switch's
    for Qwen3, the sequence-wise one for GLM: a mean over a micro-batch's tokens, so the same only
    over the same rows), with the activations of the tokens alone."""
    preset = materialize_preset(name, seed=0)
    aux = LossConfig(router_aux_coef=0.01)
    plain = budget_step(preset, None, stage, micro=8, loss_cfg=aux)
    packed = budget_step(preset, 128, stage, micro=8, packed=True, loss_cfg=aux)
    same_step(packed, plain)
    real = uneven_batch(100).loss_mask.bool()
    assert torch.allclose(packed["pi_old"][real], plain["pi_old"][real], atol=1e-5)
    for key in ("moe/aux_loss", "moe/expert_load_max", "moe/expert_load_min"):
        assert packed["metrics"][key] == pytest.approx(plain["metrics"][key], rel=1e-4, abs=1e-6), key
    # The batch's 111 tokens as one sequence, against 8 x 48 = 384 cells.
    assert (plain["micros"], packed["micros"]) == (1, 1)
    assert packed["saved"] < 0.4 * plain["saved"]
    # Split over packed micro-batches ([48, 12] and [11, 10, 9, 8, 7, 6]), the policy loss is the same.
    split = budget_step(preset, 64, stage, micro=8, packed=True)
    assert split["micros"] == 2
    same_step(split, budget_step(preset, None, stage, micro=8))


class LargestLogits(TorchDispatchMode):
    """The most elements of any tensor of logits (last dimension the vocabulary, not shaped like a
    parameter or its transpose) an operator returns while the mode is on, forward or backward."""

    def __init__(self, vocab: int, params: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.vocab, self.params, self.largest = vocab, params, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            logits = isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
            if logits and tuple(t.shape) not in self.params:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_no_step_builds_the_logits_of_the_batch(preset: Path, stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a step's forward and backward, logits exist a chunk of tokens at a time (1,024 fp32 logits
    here), never for the batch (what `forward` builds, as the control shows): the log-probs and the
    entropy come from the hidden states through the output layer."""
    monkeypatch.setattr(forward_module, "CHUNK_BYTES", 4 * 2**10)
    model = load_model(preset)
    vocab = model.config.vocab_size
    params = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    batch = uneven_batch(vocab)
    trainer = DeepSpeedTrainer(model, TrainerConfig(lr=1e-3, micro_batch_size=8, zero_stage=stage))
    loss = RLLoss(LossConfig(entropy_coef=0.01), temperature=1.0, max_len=WIDTH)
    seen = LargestLogits(vocab, params)
    metrics = values(trainer.train_step(batch, loss_fn=loss, around=lambda micro: seen))
    assert math.isfinite(metrics["loss"]) and metrics["tokens"] == sum(LENGTHS) - len(LENGTHS) * PROMPT_LEN
    assert 0 < seen.largest <= 2**10, seen.largest
    control = LargestLogits(vocab, params)
    with control, torch.no_grad():
        forward(trainer.module, batch.input_ids, batch.attention_mask)
    assert control.largest == batch.input_ids.numel() * vocab


def _as_rank(rank: int, port: int) -> None:
    """This spawned process as rank `rank` of a local world of two (init_distributed joins it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _leave_together() -> None:
    # A rank that exits while its peer still holds gloo connections can abort the peer.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _two_ranks(rank: int, port: int, path: str, out: str, packed: bool) -> None:
    _as_rank(rank, port)
    # Rank 0 holds the long row (plan [48], [12, 9, 7]); rank 1 only short ones (one micro-batch),
    # so it runs a filler for the other: at ZeRO-3 a rank short of a forward would hang the step.
    got = budget_step(Path(path), 48, 3, (4 * rank, 4 * rank + 4), packed=packed)
    if rank == 0:
        torch.save({k: got[k] for k in ("metrics", "grads")}, Path(out) / "two.pt")
    _leave_together()


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_two_ranks_with_plans_of_different_lengths_take_the_same_step(
    preset: Path, tmp_path: Path, packed: bool
) -> None:
    from tidal.trainer.prepare import free_port

    mp.spawn(_two_ranks, args=(free_port(), str(preset), str(tmp_path), packed), nprocs=2, join=True)
    same_step(torch.load(tmp_path / "two.pt"), budget_step(preset, None, 0))


# The KL reference (`algorithm.loss.kl`): held as the policy is, never a whole fp32 copy per rank.


def reference_logprobs(preset: Path, stage: int, precision: str) -> dict[str, Any]:
    from tidal.trainer.prepare import init_distributed, load_reference

    cfg = TrainerConfig(lr=1e-3, micro_batch_size=4, zero_stage=stage, precision=precision)
    init_distributed(cfg.backend)
    ref = load_reference(preset, cfg, torch.device("cpu"))
    batch = uneven_batch(100)
    params = list(ref.parameters())
    return {
        "logp": batch_logprobs(ref, batch, 1.0, 4),
        "dtypes": {p.dtype for p in params},
        "partitioned": all(hasattr(p, "ds_id") for p in params),
        # What this rank holds (at ZeRO-3 its partition; the rest is gathered a block at a time).
        "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
        "grad": any(p.requires_grad for p in params),
    }


@pytest.mark.parametrize(("stage", "precision"), [(0, "bf16"), (3, "bf16"), (3, "fp32")])
def test_the_kl_reference_is_held_as_the_policy_is(preset: Path, stage: int, precision: str) -> None:
    got = reference_logprobs(preset, stage, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert got["dtypes"] == {dtype} and not got["grad"]
    assert got["partitioned"] == (stage == 3)
    # The same log-probs as the checkpoint's weights in that dtype, held whole: equal to the bit
    # (measured, in both dtypes, partitioned or not).
    want = batch_logprobs(load_model(preset).to(dtype).eval(), uneven_batch(100), 1.0, 4)
    real = uneven_batch(100).loss_mask.bool()
    assert torch.equal(got["logp"][real], want[real])


def _reference_ranks(rank: int, port: int, path: str, out: str) -> None:
    _as_rank(rank, port)
    torch.save(reference_logprobs(Path(path), 3, "bf16"), Path(out) / f"ref{rank}.pt")
    _leave_together()


@pytest.mark.slow
def test_two_ranks_hold_half_the_reference_each(preset: Path, tmp_path: Path) -> None:
    from tidal.trainer.prepare import free_port

    mp.spawn(_reference_ranks, args=(free_port(), str(preset), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"ref{r}.pt") for r in (0, 1)]
    whole = sum(p.numel() for p in load_model(preset).parameters())
    assert all(r["partitioned"] for r in ranks)
    assert all(r["local"] <= whole / 2 + 1024 for r in ranks)  # each its half (partitions pad to alignment)
    assert torch.equal(ranks[0]["logp"], ranks[1]["logp"])  # both gathered the same whole reference
