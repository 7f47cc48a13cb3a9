"""Crash-consistent checkpoints of an RL run, and the checks a resume goes through.

A checkpoint of step k is the directory `runs/<name>/checkpoints/step_<k>/`:

- `trainer/`: DeepSpeed's own checkpoint (parameters, optimizer, lr scheduler, each rank's ZeRO
  partitions) with the trainer's client state (the groups it trained, its RNG state);
- `driver.pkl`: everything else the run's future depends on: the driver's step, trainer and
  published versions and dispatch state, the prompt sampler (shuffled order, position, RNG, next
  group id), the staleness bound, the buffer's groups not trained yet (tokens, per-token versions,
  behavior log-probs) and its ledger, the held-out accuracy before training, the wandb run id and
  the run's config;
- `manifest.json`, written last: each file's size.

No group is in flight in a checkpoint: at a checkpoint step the driver first lets every dispatched
group land in the buffer, so the checkpoint holds them as generated. A checkpoint is written into
`step_<k>.tmp/` and renamed when whole, so a crash during a save leaves the previous one; one whose
files do not match its manifest is skipped with a warning.

Whole means every trainer rank's files too: each rank reports the files it wrote and the driver
seals only once it sees them all (a rank on a node that does not share output_dir writes into a
`step_<k>.tmp/` of its own); before loading, each rank checks it sees the manifest's files.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidal.config import ConfigError, RunConfig
from tidal.runtime import RunError
from tidal.telemetry.rows import SUMMARY_KEY
from tidal.types import CheckpointShard

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DRIVER = "driver.pkl"
TRAINER = "trainer"

SAFE_TO_CHANGE = (
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.save_checkpoint",
    "eval.",
    "monitor.",
    "ray.",
    "name",
    "output_dir",
    "weight_sync.transport.",
    "weight_sync.bucket_mb",
    "trainer.schedule.total_steps",
)
"""Config keys a resume may change (prefixes end with a dot): the run's length, cadence, logging,
resources, how weights travel (every transport delivers the same bits) and the lr schedule's length
(see `resumed_schedule`). Any other change alters what the run trains on or how, and is refused."""


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every whole checkpoint, oldest first; a damaged one is skipped with a
    warning naming it (an unfinished `.tmp` one is ignored)."""
    root = checkpoints_dir(run_dir)
    out = []
    for path in sorted(root.glob("step_*")) if root.is_dir() else []:
        if path.name.endswith(".tmp"):
            continue
        problem = _damage(path)
        if problem:
            log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        out.append((int(path.name.removeprefix("step_")), path))
    return sorted(out)


def _damage(path: Path) -> str | None:
    try:
        sizes = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    unlike = _unlike(path, sizes)
    return f"{unlike[0][0]} is missing or not the size it was written with" if unlike else None


def _unlike(root: Path, sizes: dict[str, int]) -> list[tuple[str, int | None]]:
    """(name, size found, None when missing) of each file of `sizes` (names relative to `root`) that
    is missing under `root` or of another size, in name order."""
    found = [(name, (root / name).stat().st_size if (root / name).is_file() else None) for name in sorted(sizes)]
    return [(name, size) for name, size in found if size != sizes[name]]


def listing(root: Path) -> dict[str, int]:
    """Every file under `root` (none if it does not exist): its name relative to `root`, its size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def latest_checkpoint(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"train.resume=true but {checkpoints_dir(run_dir)} holds no complete checkpoint")
    return found[-1][1]


def resume_hint(run_dir: Path) -> str:
    """How to continue a run that stopped on a failure, for its one-line error."""
    found = complete_checkpoints(run_dir)
    if not found:
        return "no checkpoint to resume from (train.checkpoint_every writes them)"
    return f"to continue from {found[-1][1]}, run the same command with train.resume=true"


def refuse_overwrite(run_dir: Path) -> None:
    """A new run must not write over a run that left checkpoints."""
    root = checkpoints_dir(run_dir)
    if root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: resume it with train.resume=true, or choose "
            "another name or output_dir"
        )


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted config keys whose values differ between the checkpoint's config and this one, except
    those safe to change."""
    a, b = _flatten(saved), _flatten(now)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in SAFE_TO_CHANGE)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(path: Path, config: dict[str, Any], steps: int) -> dict[str, Any]:
    """The driver state of checkpoint `path`, once the run's config is known to fit it."""
    with (path / DRIVER).open("rb") as f:
        state = pickle.load(f)
    changed = changed_keys(state["config"], config)
    if changed:
        raise ConfigError(
            f"cannot resume {path} with a config that changes {', '.join(changed)}; only the run's "
            "length, eval and logging cadence, monitor.*, ray.* and the weight transport may "
            "change"
        )
    if state["step"] > steps:
        raise ConfigError(f"{path} is at step {state['step']}, past train.steps={steps}")
    return state


def resume_point(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any] | None]:
    """The config a run goes on with, and with `train.resume` the newest checkpoint's driver state
    (its directory under "path", how the lr schedule goes on under "schedule") once the config is
    known to fit it. A new run gets None, and must not overwrite one that left checkpoints."""
    if not cfg.train.resume:
        refuse_overwrite(cfg.run_dir)
        return cfg, None
    path = latest_checkpoint(cfg.run_dir)
    state = check_resume(path, cfg.model_dump(mode="json"), cfg.train.steps)
    cfg, schedule = resumed_schedule(state["config"], cfg)
    return cfg, {**state, "path": path, "schedule": schedule}


def resumed_schedule(saved: dict[str, Any], cfg: RunConfig) -> tuple[RunConfig, str]:
    """The config a resume goes on with, the length of its lr schedule decided, and how the schedule
    goes on (for the resume's first log line); `saved` is the checkpoint's config.

    The length is fixed when a run first starts: `trainer.schedule.total_steps`, else `train.steps x
    algorithm.minibatches` optimizer steps. A resume keeps it whatever `train.steps` says now, so the
    lr goes on along the curve it was on (past its end, at the floor), and writes it into the config
    (`trainer.schedule.total_steps`), which the checkpoints then carry to later resumes. Only a
    `total_steps` set now re-times the schedule: the lr moves to the new curve at once."""
    schedule = cfg.trainer.schedule
    was = saved["trainer"]["schedule"]["total_steps"] or saved["train"]["steps"] * saved["algorithm"]["minibatches"]
    if schedule.type == "constant":
        return cfg, "the lr is constant after its warm-up, whatever train.steps"
    curve = f"the {schedule.type} lr schedule"
    if schedule.total_steps is not None:
        if schedule.total_steps == was:
            return cfg, f"{curve} goes on over its {was} optimizer steps (trainer.schedule.total_steps)"
        return cfg, (
            f"{curve} spanned {was} optimizer steps and now spans trainer.schedule.total_steps="
            f"{schedule.total_steps}: the lr moves to the new curve at once"
        )
    trainer = cfg.trainer.model_copy(update={"schedule": schedule.model_copy(update={"total_steps": was})})
    kept = cfg.model_copy(update={"trainer": trainer})
    now = cfg.train.steps * cfg.algorithm.minibatches
    if now == was:
        return kept, f"{curve} goes on over its {was} optimizer steps"
    floor = schedule.min_lr_ratio * (cfg.trainer.lr or 0.0)
    end = (
        f"the last {now - was} train at its floor, lr {floor:g} (trainer.schedule.min_lr_ratio="
        f"{schedule.min_lr_ratio:g})"
        if now > was
        else "the run ends before its decay does"
    )
    return kept, (
        f"train.steps is {cfg.train.steps} now ({now} optimizer steps), but {curve} keeps the length it "
        f"started with, {was} optimizer steps, so {end}; set trainer.schedule.total_steps to re-time it"
    )


def truncate_rows(path: Path, step: int) -> None:
    """Drop the rows of a jsonl log (metrics, schedule) past `step`, and a run's final summary row: a
    resumed run logs them anew."""
    if path.is_file():
        rows = path.read_text().splitlines(keepends=True)
        path.write_text("".join(r for r in rows if (row := json.loads(r))["step"] <= step and SUMMARY_KEY not in row))


def begin(run_dir: Path, step: int) -> Path:
    """An empty directory to write checkpoint `step` into."""
    tmp = checkpoints_dir(run_dir) / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_driver_state(tmp: Path, state: dict[str, Any]) -> None:
    with (tmp / DRIVER).open("wb") as f:
        pickle.dump(state, f)


def commit(tmp: Path, keep: int, shards: Sequence[CheckpointShard] = ()) -> Path:
    """Seal the checkpoint written into `tmp` (manifest last, then one rename) and delete all but
    the newest `keep`. `shards` are what the trainer ranks report they wrote into its trainer part:
    every file of each must be here, at its size, or nothing is sealed (`check_shards`)."""
    check_shards(tmp, shards)
    sizes = listing(tmp)
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps(sizes, indent=1))
    _fsync(manifest)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for _, old in complete_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


SHARED = "every node must see the same output_dir: put it on a shared filesystem"
"""How to fix a checkpoint whose trainer ranks and driver see different files."""


def check_shards(tmp: Path, shards: Sequence[CheckpointShard]) -> None:
    """Before checkpoint `tmp` is sealed: the driver sees every file each trainer rank wrote into its
    trainer part, at the size the rank wrote. A rank on a node that does not share output_dir writes
    into a `step_*.tmp/` of its own, which the driver would seal as complete and a resume could not
    load; such a save fails with one line naming the ranks and their files."""
    root = tmp / TRAINER
    unseen = []
    for shard in sorted(shards, key=lambda s: s.rank):
        unlike = _unlike(root, shard.files)
        if unlike:
            files = ", ".join(
                f"{TRAINER}/{name} "
                + ("(missing)" if size is None else f"({size} bytes here, {shard.files[name]} written)")
                for name, size in unlike
            )
            unseen.append(f"trainer rank {shard.rank} wrote {files}")
    if unseen:
        raise RunError(f"checkpoint {tmp} is incomplete as the driver sees it: {'; '.join(unseen)}; {SHARED}")


def shard_problem(path: Path, rank: int) -> str | None:
    """Why trainer rank `rank` cannot load the trainer part `path` of a checkpoint as the driver sealed
    it, or None: it does not see the checkpoint's manifest, or a file of the trainer part the manifest
    lists is missing or of another size where the rank looks (DeepSpeed reads the files of other ranks
    too: the model states of rank 0, every partition when resharding)."""
    manifest = path.parent / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"trainer rank {rank} cannot read {manifest} ({type(e).__name__})"
    mine = {name: size for name, size in sizes.items() if name.startswith(f"{path.name}/")}
    unlike = _unlike(path.parent, mine)
    if not unlike:
        return None
    files = ", ".join(
        f"{name} " + ("(missing)" if size is None else f"({size} bytes, the manifest says {mine[name]})")
        for name, size in unlike
    )
    return f"trainer rank {rank} finds {files} in {path.parent}"
