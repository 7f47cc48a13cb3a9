"""The shipped configs run as a user runs them: `tidal train CONFIG` in a subprocess."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def train_run(tmp_path: Path) -> Callable[[str, str, int], Path]:
    """`train_run(config, name, timeout_s)`: `tidal train config` into tmp_path (wandb off, no
    periodic checkpoint), asserted to exit 0; the run's directory."""

    def run(config: str, name: str, timeout_s: int) -> Path:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tidal.cli",
                "train",
                config,
                f"output_dir={tmp_path}",
                "monitor.wandb=disabled",
                "train.save_checkpoint=false",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return tmp_path / name

    return run
