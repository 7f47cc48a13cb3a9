"""Pure pieces of the trainer: lr schedule, micro-batch split, next-token NLL."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.config import ScheduleConfig
from tidal.model.batching import micro_batches
from tidal.model.forward import positions
from tidal.trainer.losses_sft import next_token_nll, num_targets
from tidal.trainer.prepare import lr_factor
from tidal.types import TokenBatch

pytestmark = pytest.mark.unit


def test_constant_with_warmup() -> None:
    s = ScheduleConfig(type="constant", warmup_steps=3)
    assert [lr_factor(i, s, None) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_no_warmup_starts_at_peak() -> None:
    assert lr_factor(0, ScheduleConfig(), None) == 1.0


def test_cosine_reaches_floor_on_last_step_and_stays() -> None:
    s = ScheduleConfig(type="cosine", warmup_steps=1, total_steps=6, min_lr_ratio=0.2)
    got = [lr_factor(i, s, 6) for i in range(8)]
    # Decay over steps 1..5: progress 0, 1/4, 1/2, 3/4, 1.
    want = [0.5] + [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1)] + [0.2, 0.2]
    assert got == pytest.approx(want)


def test_linear_decay() -> None:
    s = ScheduleConfig(type="linear", total_steps=5)
    assert [lr_factor(i, s, 5) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_decay_without_length_fails_fast() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, ScheduleConfig(type="cosine"), None)


def test_split_micro_batches_keeps_rows_together() -> None:
    ids = torch.arange(15).view(5, 3)
    batch = TokenBatch(ids, torch.ones_like(ids), ids % 2)
    micros = micro_batches(batch, 2)
    assert [m.input_ids.shape[0] for m in micros] == [2, 2, 1]
    assert torch.equal(torch.cat([m.loss_mask for m in micros]), batch.loss_mask)
    assert torch.equal(micros[2].input_ids, ids[4:])


def test_next_token_nll_by_hand() -> None:
    # Vocabulary of 2; position t predicts token t + 1. Logits (0, 0) give ln 2, (ln 3, 0) give
    # p(0) = 3/4. Targets: token 1 at t=1 (from logits[0]) and token 0 at t=2 (from logits[1]).
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    assert next_token_nll(logits, ids, mask).item() == pytest.approx(math.log(2) - math.log(0.75))
    assert num_targets(mask).item() == 2
    # A masked target contributes nothing.
    assert next_token_nll(logits, ids, torch.tensor([[0, 0, 1]])).item() == pytest.approx(-math.log(0.75))


def test_position_ids_skip_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_a_resume_with_more_steps_goes_on_along_the_lr_curve_it_started() -> None:
    """A cosine run of 10 steps x 2 minibatches (20 optimizer steps), resumed at step 6 with
    train.steps=15: optimizer steps 12.. follow the 20-step curve, then its floor, as without the
    resume, where a 30-step curve (the length now) would make the lr jump up."""
    from tidal.checkpoint import resumed_schedule
    from tidal.config import load_config

    args = [
        "trainer.schedule={type: cosine, warmup_steps: 2, min_lr_ratio: 0.1}",
        "algorithm.minibatches=2",
        "trainer.lr=1e-3",
        "train.resume=true",
    ]
    first = load_config(None, [*args, "train.steps=10"]).for_rl()
    resumed, note = resumed_schedule(first.model_dump(mode="json"), load_config(None, [*args, "train.steps=15"]))
    s = resumed.trainer.schedule
    assert s.total_steps == 20 and resumed.train.steps == 15
    curve = [lr_factor(i, first.trainer.schedule, 20) for i in range(30)]
    assert [lr_factor(i, s, s.total_steps) for i in range(12, 30)] == curve[12:]
    assert curve[19:] == pytest.approx([0.1] * 11)
    assert lr_factor(13, s, 30) - lr_factor(12, s, 20) > 0.1  # the jump a 30-step curve makes after the resume
    assert note == (
        "train.steps is 15 now (30 optimizer steps), but the cosine lr schedule keeps the length it "
        "started with, 20 optimizer steps, so the last 10 train at its floor, lr 0.0001 "
        "(trainer.schedule.min_lr_ratio=0.1); set trainer.schedule.total_steps to re-time it"
    )
    # A later resume keeps it too: the checkpoints carry the length in their config.
    again, note = resumed_schedule(resumed.model_dump(mode="json"), load_config(None, [*args, "train.steps=15"]))
    assert again.trainer.schedule.total_steps == 20
    assert "keeps the length it started with, 20 optimizer steps, so the last 10 train at its floor" in note
    # Set on the resume, the length re-times the schedule.
    longer = load_config(None, [*args, "train.steps=15", "trainer.schedule.total_steps=30"])
    retimed, note = resumed_schedule(first.model_dump(mode="json"), longer)
    assert retimed.trainer.schedule.total_steps == 30
    assert note == (
        "the cosine lr schedule spanned 20 optimizer steps and now spans trainer.schedule.total_steps=30: "
        "the lr moves to the new curve at once"
    )
    # Unchanged steps: the same curve; a constant schedule has no length to keep.
    same, note = resumed_schedule(first.model_dump(mode="json"), load_config(None, [*args, "train.steps=10"]))
    assert same.trainer.schedule.total_steps == 20
    assert note == "the cosine lr schedule goes on over its 20 optimizer steps"
    flat = load_config(None, ["train.steps=10"])
    kept, note = resumed_schedule(flat.model_dump(mode="json"), load_config(None, ["train.steps=15"]))
    assert kept == load_config(None, ["train.steps=15"]) and "constant" in note
