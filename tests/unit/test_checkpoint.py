"""Checkpoint directories: atomic commits, damaged or unfinished ones skipped, the newest kept, a
resume refused when the config changes the run's meaning, logs cut back to the checkpoint's step."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from tidal import checkpoint
from tidal.config import ConfigError, load_config
from tidal.rollout.buffer import TrajectoryBuffer
from tidal.stages.train import PromptSampler
from tidal.telemetry.rows import SUMMARY_KEY

pytestmark = pytest.mark.unit


def write(run_dir: Path, step: int, keep: int = 2, payload: bytes = b"weights") -> Path:
    tmp = checkpoint.begin(run_dir, step)
    (tmp / checkpoint.TRAINER).mkdir()
    (tmp / checkpoint.TRAINER / "model.pt").write_bytes(payload)
    checkpoint.write_driver_state(tmp, {"step": step})
    return checkpoint.commit(tmp, keep)


def test_commit_renames_a_whole_checkpoint_and_keeps_the_newest(tmp_path: Path) -> None:
    paths = [write(tmp_path, step) for step in (2, 4, 6)]
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [4, 6]
    assert not paths[0].exists() and checkpoint.latest_checkpoint(tmp_path) == paths[2]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    sizes = json.loads((paths[2] / checkpoint.MANIFEST).read_text())
    assert sizes == {"driver.pkl": (paths[2] / "driver.pkl").stat().st_size, "trainer/model.pt": 7}


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write(tmp_path, 4)
    # Killed mid-write: the directory was never renamed.
    half = checkpoint.begin(tmp_path, 6)
    (half / checkpoint.DRIVER).write_bytes(b"\x80")
    # Damaged after the fact: a file shorter than its manifest says, and one without a manifest.
    bad = write(tmp_path, 8, keep=3)
    (bad / checkpoint.TRAINER / "model.pt").write_bytes(b"cut")
    (tmp_path / "checkpoints" / "step_00000010").mkdir()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest_checkpoint(tmp_path) == good
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "step_00000008: trainer/model.pt is missing or not the size" in warned
    assert "step_00000010: no readable manifest.json" in warned
    assert "step_00000006" not in warned  # an unfinished save is not a checkpoint at all


def test_no_complete_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.resume=true but .*checkpoints holds no complete checkpoint$"):
        checkpoint.latest_checkpoint(tmp_path)


def test_a_new_run_does_not_overwrite_one_with_checkpoints(tmp_path: Path) -> None:
    checkpoint.refuse_overwrite(tmp_path)  # nothing there yet
    write(tmp_path, 2)
    with pytest.raises(ConfigError, match="already holds checkpoints: resume it with train.resume=true"):
        checkpoint.refuse_overwrite(tmp_path)


def test_resume_refuses_a_config_that_changes_the_run(tmp_path: Path) -> None:
    saved = load_config(None, ["model.preset=tiny-qwen3-moe", "rollout.group_size=4"]).model_dump(mode="json")
    path = write(tmp_path, 2)
    checkpoint.write_driver_state(path, {"step": 2, "config": saved})
    safe = [
        "model.preset=tiny-qwen3-moe",
        "rollout.group_size=4",
        "train.steps=500",
        "train.eval_every=3",
        "monitor.wandb=disabled",
        "ray.stall_timeout_s=60",
        "train.resume=true",
        "eval.num_samples=4",
        "weight_sync.transport.type=disk",
    ]
    assert checkpoint.check_resume(path, load_config(None, safe).model_dump(mode="json"), 500)["step"] == 2
    changed = load_config(
        None, ["model.preset=tiny-glm5-moe", "rollout.group_size=8", "algorithm.loss.entropy_coef=0.1"]
    )
    with pytest.raises(ConfigError) as err:
        checkpoint.check_resume(path, changed.model_dump(mode="json"), 100)
    msg = str(err.value)
    assert "changes algorithm.loss.entropy_coef, model.preset, rollout.group_size;" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="is at step 2, past train.steps=1"):
        checkpoint.check_resume(path, saved, 1)


def test_a_resume_with_more_steps_keeps_the_lr_schedule_it_started_with(tmp_path: Path) -> None:
    """`train.steps` may change on a resume, the lr schedule's length does not follow it (see
    test_trainer_schedule.py for the curve); set explicitly, the length may change too."""
    run = [f"output_dir={tmp_path}", "name=r", "trainer.schedule.type=cosine", "trainer.lr=1e-3"]
    saved = load_config(None, [*run, "train.steps=4"]).for_rl()
    tmp = checkpoint.begin(tmp_path / "r", 2)
    checkpoint.write_driver_state(tmp, {"step": 2, "config": saved.model_dump(mode="json")})
    path = checkpoint.commit(tmp, keep=2)
    cfg, state = checkpoint.resume_point(load_config(None, [*run, "train.steps=6", "train.resume=true"]).for_rl())
    assert state is not None and (state["step"], state["path"]) == (2, path)
    assert cfg.train.steps == 6 and cfg.trainer.schedule.total_steps == 4
    assert "keeps the length it started with, 4 optimizer steps, so the last 2 train at its floor" in state["schedule"]
    longer = load_config(None, [*run, "train.steps=6", "train.resume=true", "trainer.schedule.total_steps=6"])
    cfg, state = checkpoint.resume_point(longer.for_rl())
    assert cfg.trainer.schedule.total_steps == 6 and state is not None and "now spans" in state["schedule"]
    # A new run is not resumed, and keeps its config as it is.
    new = saved.model_copy(update={"name": "new"})
    assert checkpoint.resume_point(new) == (new, None)


def test_logs_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0},
        {"step": 1},
        {"step": 2},
        {"step": 2, "eval/accuracy": 0.5},
        {"step": 3},
        {"step": 3, SUMMARY_KEY: 8.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.truncate_rows(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:4]


def test_sampler_and_buffer_state_round_trip() -> None:
    from datasets import Dataset

    from tidal.config import FilterConfig

    ds = Dataset.from_list([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)])
    a = PromptSampler({"": (ds, 1.0)}, seed=3)
    a.take(7)
    b = PromptSampler({"": (ds, 1.0)}, seed=99)
    b.load_state(pickle.loads(pickle.dumps(a.state())))
    assert [(p.group_id, p.row) for p in a.take(9)] == [(p.group_id, p.row) for p in b.take(9)]
    buffer = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=1)
    buffer.dispatched(1, 2)
    again = TrajectoryBuffer(FilterConfig(zero_variance=False), max_staleness=1)
    again.load_state(pickle.loads(pickle.dumps(buffer.state())))
    assert again.ledger() == buffer.ledger() and again.ledger()["in_flight_groups"] == 2


# ------------------------------------------------------------------------- trainer ranks' shards


def test_a_rank_whose_files_the_driver_cannot_see_fails_the_save_in_one_line(tmp_path: Path) -> None:
    """Trainer ranks on nodes that do not share output_dir write into a `step_*.tmp/` of their own:
    the driver, which seals the checkpoint, must see every file each rank reports, at its size."""
    from tidal.runtime import RunError
    from tidal.types import CheckpointShard

    tmp = checkpoint.begin(tmp_path, 2)
    (tmp / checkpoint.TRAINER).mkdir()
    (tmp / checkpoint.TRAINER / "model.pt").write_bytes(b"weights")
    checkpoint.write_driver_state(tmp, {"step": 2})
    rank0 = CheckpointShard(rank=0, files={"model.pt": 7}, seconds=0.1)
    elsewhere = CheckpointShard(rank=1, files={"zero_1.pt": 5, "model.pt": 7}, seconds=0.1)
    with pytest.raises(RunError) as err:
        checkpoint.commit(tmp, keep=2, shards=[rank0, elsewhere])
    line = str(err.value)
    assert "\n" not in line and "rank 1" in line and "trainer/zero_1.pt (missing)" in line, line
    assert "rank 0" not in line and "shared" in line and "output_dir" in line, line
    assert not checkpoint.complete_checkpoints(tmp_path) and tmp.is_dir()  # nothing sealed
    # A file the driver sees at another size than its rank wrote is not that rank's file either.
    with pytest.raises(RunError, match=r"rank 0 .*trainer/model\.pt \(7 bytes here, 9 written\)"):
        checkpoint.commit(tmp, keep=2, shards=[CheckpointShard(rank=0, files={"model.pt": 9}, seconds=0.1)])
    sealed = checkpoint.commit(tmp, keep=2, shards=[rank0])
    assert [p for _, p in checkpoint.complete_checkpoints(tmp_path)] == [sealed]


def test_a_rank_checks_its_view_of_the_checkpoint_before_loading_it(tmp_path: Path) -> None:
    path = write(tmp_path, 2, payload=b"weights")
    trainer = path / checkpoint.TRAINER
    assert checkpoint.shard_problem(trainer, rank=1) is None  # all there
    (trainer / "model.pt").write_bytes(b"cut")
    assert checkpoint.shard_problem(trainer, rank=1) == (
        f"trainer rank 1 finds trainer/model.pt (3 bytes, the manifest says 7) in {path}"
    )
    (trainer / "model.pt").unlink()
    assert checkpoint.shard_problem(trainer, rank=1) == f"trainer rank 1 finds trainer/model.pt (missing) in {path}"
    (path / checkpoint.DRIVER).unlink()  # not the trainer's: its own check is the driver's
    assert "driver.pkl" not in str(checkpoint.shard_problem(trainer, rank=1))
    (path / checkpoint.MANIFEST).unlink()  # a node that sees none of the run's checkpoint
    assert checkpoint.shard_problem(trainer, rank=0) == (
        f"trainer rank 0 cannot read {path / checkpoint.MANIFEST} (FileNotFoundError)"
    )
