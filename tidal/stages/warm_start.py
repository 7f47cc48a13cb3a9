"""The policy's starting checkpoint: a preset, a HF directory, or an SFT run trained once and cached.

`model.sft_warm_start: configs/sft_arithmetic.yaml` names an SFT run config. Its checkpoint is
cached under `$TIDAL_CACHE/warm_start/<config stem>-<hash>/`, keyed by everything that changes the
weights (model, data, trainer, sft, seed), so editing the SFT recipe retrains and anything else
reuses it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tidal.config import ModelConfig, load_config
from tidal.model.loading import resolve_model_dir, warm_start_dir

log = logging.getLogger(__name__)


def resolve_policy_dir(cfg: ModelConfig) -> tuple[Path, dict[str, float]]:
    """(checkpoint directory, warm-start summary) of the policy's initial weights.

    With `sft_warm_start`, trains the SFT run on first use (in this process) and reuses it after;
    the summary holds that run's held-out metrics (empty without a warm start).
    """
    if cfg.sft_warm_start is None:
        return resolve_model_dir(cfg), {}
    run_dir = warm_start_dir(cfg.sft_warm_start)
    summary_file = run_dir / "summary.json"  # written last: its presence marks a finished run
    if not summary_file.is_file():
        from tidal.stages.sft import run_sft

        sft_cfg = load_config(
            cfg.sft_warm_start,
            [f"output_dir={run_dir.parent}", f"name={run_dir.name}", "monitor.wandb=disabled"],
        )
        log.info("training the SFT warm start %s into %s (once; later runs reuse it)", cfg.sft_warm_start, run_dir)
        run_sft(sft_cfg)
    else:
        log.info("reusing the SFT warm start %s", run_dir)
    return run_dir / "checkpoint", json.loads(summary_file.read_text())
