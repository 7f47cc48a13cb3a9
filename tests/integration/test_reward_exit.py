"""A scorer never closed, whose sync reward hung (killed in its reward process), does not hold up the
exit of its process (a real subprocess): neither the pool's processes nor its threads keep it alive."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_hung_reward_does_not_hold_up_process_exit(tmp_path: Path) -> None:
    (tmp_path / "hang.py").write_text("import time\n\ndef hang(sample, row):\n    time.sleep(120)\n    return 1.0\n")
    script = textwrap.dedent(
        f"""
        from tidal.config import RewardsConfig, RewardSpec
        from tidal.telemetry.metrics import values
        from tidal.rewards import RewardScorer
        from tidal.types import Sample

        cfg = RewardsConfig(functions=[RewardSpec(path={str(tmp_path / "hang.py")!r} + ":hang")], timeout_s=0.2)
        sample = Sample(0, [1], [2], [1], [-0.1], "stop", 0, [0], text="19", row={{"answer": "19"}})
        print(values(RewardScorer(cfg).score([sample]))["reward/failed_timeout"])  # never closed on purpose
        """
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"
    assert time.perf_counter() - start < 60  # not the 120 s sleep
