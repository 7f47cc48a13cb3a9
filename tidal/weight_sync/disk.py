"""`disk`: one directory of safetensors files (a file per bucket) per version, on a disk the workers
share, for engines that reload weights from disk."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tidal.config import DiskSync
from tidal.weight_sync.common import (
    GroupAddress,
    WeightHandle,
    Weights,
    _check_transport,
    _log_publish,
    as_buckets,
    state_nbytes,
)


@dataclass(frozen=True)
class DiskFile:
    """The payload of a disk handle: the version's directory and its files, in publish order."""

    path: str
    files: tuple[str, ...]
    keep: int


class DiskPublisher:
    """Writes `<dir>/v{version:08d}/` with one safetensors file per bucket, atomically (a temporary
    directory renamed), and keeps the newest `keep` versions.

    Newest in publication order, counting only versions this publisher wrote: a restarted run that
    publishes lower versions than a previous run left in `dir` must not delete its own fresh ones.
    """

    def __init__(self, cfg: DiskSync, weights_dir: Path, group: GroupAddress | None) -> None:
        self.dir = Path(cfg.dir) if cfg.dir is not None else weights_dir
        self.keep = cfg.keep
        self.dir.mkdir(parents=True, exist_ok=True)
        self._written: list[Path] = []

    def publish(self, weights: Weights, version: int) -> WeightHandle:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        path = self.dir / f"v{version:08d}"
        tmp = self.dir / f".{path.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files, nbytes = [], 0
        for i, chunk in enumerate(as_buckets(weights)):
            files.append(f"part-{i:05d}.safetensors")
            save_file(unshared(chunk), str(tmp / files[-1]), metadata={"version": str(version)})
            nbytes += state_nbytes(chunk)
        shutil.rmtree(path, ignore_errors=True)  # a previous run's copy of this version
        os.replace(tmp, path)  # readers see the whole version or none
        self._written = [p for p in self._written if p != path] + [path]
        for old in self._written[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self._written = self._written[-self.keep :]
        handle = WeightHandle(version, nbytes, "disk", DiskFile(str(path), tuple(files), self.keep))
        _log_publish(handle, t0)
        return handle

    def close(self) -> None:
        pass


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): later sharers are cloned."""
    seen: set[int] = set()
    out = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t.detach().contiguous()
    return out


class DiskReceiver:
    """Loads the handle's files in order; within a file tensors come by name, not in the trainer's order."""

    def __init__(self, cfg: DiskSync, group: GroupAddress | None, rank: int) -> None:
        pass

    def receive_buckets(self, handle: WeightHandle) -> Iterator[dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        _check_transport(handle, "disk")
        file: DiskFile = handle.payload
        for name in file.files:
            try:
                bucket = load_file(os.path.join(file.path, name))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"disk weight sync: {file.path} (v{handle.version}) was removed before this "
                    f"worker read it: raise weight_sync.transport.keep (now {file.keep}) or the "
                    "worker is too slow to keep up"
                ) from None
            yield bucket

    def close(self) -> None:
        pass
