"""The terminal sink on a real pseudo-terminal: a progress bar with ETA and a panel, redrawn in place."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import time
from tidal.telemetry.monitor import ConsoleSink
sink = ConsoleSink(total_steps=6, log_every=100)
assert sink.live is not None, "a terminal was not detected"
for step in range(1, 7):
    sink.log({"reward/mean": 0.1 * step, "eval/accuracy": 0.5 if step == 3 else 0.4, "perf/step_time_s": 0.3,
              "perf/train_wall_s": 0.15, "perf/rollout_wall_s": 0.15, "reward/failed": 1.0}, step=step)
    time.sleep(0.3)
sink.close()
"""


def test_progress_bar_and_panel_in_a_pseudo_terminal() -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "30", "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # redrawn in place with cursor codes
    assert "6/6" in screen and "eta" in screen and "elapsed" in screen
    assert "best held-out accuracy" in screen and "0.5000" in screen  # the best, after it dropped back to 0.4
    assert any("failed reward calls" in line and line.rstrip().endswith(" 6") for line in screen.splitlines())
    assert "time split" in screen and "train 50%" in screen
    assert "[step " not in screen  # no plain progress lines on a terminal
