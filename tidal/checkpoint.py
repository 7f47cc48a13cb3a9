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
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from tidal.config import ConfigError
from tidal.monitor import SUMMARY_KEY

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DRIVER = "driver.pkl"
TRAINER = "trainer"

SAFE_TO_CHANGE = (
    "train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
    "train.save_checkpoint", "eval.", "monitor.", "ray.", "name", "output_dir", "weight_sync.transport.",
    "weight_sync.bucket_mb",
)  # fmt: skip
"""Config keys a resume may change (prefixes end with a dot): the run's length, cadence, logging,
resources and how weights travel (every transport delivers the same bits). Any other change alters
what the run trains on or how, and is refused."""


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
    for name, size in sizes.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or not the size it was written with"
    return None


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
        raise ConfigError(f"{run_dir} already holds checkpoints: resume it with train.resume=true, or choose "
                          "another name or output_dir")  # fmt: skip


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
        raise ConfigError(f"cannot resume {path} with a config that changes {', '.join(changed)}; only the run's "
                          "length, eval and logging cadence, monitor.*, ray.* and the weight transport may "
                          "change")  # fmt: skip
    if state["step"] > steps:
        raise ConfigError(f"{path} is at step {state['step']}, past train.steps={steps}")
    return state


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


def commit(tmp: Path, keep: int) -> Path:
    """Seal the checkpoint written into `tmp` (manifest last, then one rename) and delete all but
    the newest `keep`."""
    sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
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
