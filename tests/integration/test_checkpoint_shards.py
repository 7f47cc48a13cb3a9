"""Checkpoints of a trainer of two ranks whose nodes do not share output_dir: the driver seals a
checkpoint only once it sees every file each rank wrote, and each rank checks the files it will read
before loading, so a checkpoint that looks complete to the driver never resumes wrongly on a rank.

Real `tidal train` runs (Ray, DeepSpeed ZeRO-2 on two gloo ranks, the tiny MoE). Rank 1 of
`NodeLocalTrainer` stands for a rank on another node with a disk of its own: it reads and writes its
part of every checkpoint under `<run_dir>/node1/` instead, which the driver never looks at.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import ray

from tidal import checkpoint
from tidal.config import load_config
from tidal.model.loading import materialize_preset
from tidal.runtime import RunError
from tidal.stages.train import run_train
from tidal.trainer.actor import TrainerActor
from tidal.types import CheckpointShard

pytestmark = pytest.mark.integration
# The actors import tidal, not this test module: its classes travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

OVERRIDES = [
    "model.preset=tiny-qwen3-moe",
    "data.source.ops=[+]",
    "data.source.eval_size=8",
    "rollout.max_new_tokens=4",
    "rollout.group_size=4",
    "rollout.prompts_per_step=4",
    "rollout.num_workers=1",
    "trainer.lr=1e-3",
    "trainer.micro_batch_size=16",
    "trainer.num_ranks=2",
    "trainer.zero_stage=2",
    "train.checkpoint_every=1",
    "train.eval_every=0",
    "train.save_checkpoint=false",
    "monitor.wandb=disabled",
]
RANK1_FILE = "trainer/trainer/zero_pp_rank_1_mp_rank_00_optim_states.pt"
"""Rank 1's own file in a ZeRO-2 checkpoint (its optimizer partition), under the checkpoint directory."""


@pytest.fixture(scope="module", autouse=True)
def preset(tmp_path_factory: pytest.TempPathFactory) -> None:
    materialize_preset("tiny-qwen3-moe", seed=0)


def node1(path: Path) -> Path:
    """Where rank 1's node keeps `path`, a directory under `<run_dir>/checkpoints/`."""
    run_dir = next(p for p in path.parents if p.name == "checkpoints").parent
    return run_dir / "node1" / path.relative_to(run_dir)


class NodeLocalTrainer(TrainerActor):
    """The real trainer, whose rank 1 sees `<run_dir>/node1/checkpoints/` where the others see
    `<run_dir>/checkpoints/`, as a rank on a node whose output_dir is a local disk would."""

    def _view(self, path: str) -> str:
        return str(node1(Path(path))) if self.trainer.rank == 1 else path

    def save_state(self, path: str) -> CheckpointShard:
        return super().save_state(self._view(path))

    def load_state(self, path: str) -> int:
        return super().load_state(self._view(path))


# In the slow tier; per commit tests/unit/test_checkpoint.py checks the same rule on one process's files.
@pytest.mark.slow
def test_a_rank_writing_where_the_driver_cannot_see_fails_the_save_in_one_line(tmp_path: Path) -> None:
    cfg = load_config(None, [*OVERRIDES, "name=local", f"output_dir={tmp_path}", "train.steps=2"])
    with pytest.raises(RunError) as err:
        run_train(cfg, trainer_cls=NodeLocalTrainer)
    line = str(err.value)
    tmp = cfg.run_dir / "checkpoints" / "step_00000001.tmp"
    assert "\n" not in line and "trainer rank 1" in line and f"{RANK1_FILE} (missing)" in line, line
    assert "rank 0" not in line and str(tmp) in line and "shared filesystem" in line, line
    assert (node1(tmp) / RANK1_FILE).is_file()  # written, on "its node"
    assert not checkpoint.complete_checkpoints(cfg.run_dir)  # nothing sealed, nothing to resume wrongly


@pytest.mark.slow  # per commit, the save's check (above) and tests/unit/test_checkpoint.py's of a damaged shard
def test_a_rank_whose_view_of_the_checkpoint_is_damaged_fails_the_resume_in_one_line(tmp_path: Path) -> None:
    args = [*OVERRIDES, "name=resume", f"output_dir={tmp_path}"]
    cfg = load_config(None, [*args, "train.steps=1"])
    run_train(cfg)  # every rank writes where the driver sees: a whole checkpoint of step 1
    ((_, path),) = checkpoint.complete_checkpoints(cfg.run_dir)
    # Rank 1's node holds a copy of the checkpoint whose rank-1 file was cut short (a copy that
    # stopped midway, a disk that filled up): the driver's own view is whole.
    shutil.copytree(path, node1(path))
    whole = (path / RANK1_FILE).read_bytes()
    (node1(path) / RANK1_FILE).write_bytes(whole[: len(whole) // 2])
    resume = load_config(None, [*args, "train.steps=2", "train.resume=true"])
    with pytest.raises(RunError) as err:
        run_train(resume, trainer_cls=NodeLocalTrainer)
    line = str(err.value)
    assert "\n" not in line and "trainer rank 1" in line and str(node1(path)) in line, line
    assert f"{RANK1_FILE} ({len(whole) // 2} bytes, the manifest says {len(whole)})" in line, line
    assert "shared filesystem" in line, line
    # With the whole file on its node, the same resume goes on, past the check, to step 2: where
    # rank 1's part of that checkpoint goes to its node again, and the save fails as above.
    (node1(path) / RANK1_FILE).write_bytes(whole)
    with pytest.raises(RunError, match=r"trainer rank 1 .*zero_pp_rank_1_mp_rank_00_optim_states\.pt \(missing\)"):
        run_train(resume, trainer_cls=NodeLocalTrainer)
    assert [s for s, _ in checkpoint.complete_checkpoints(cfg.run_dir)] == [1]
