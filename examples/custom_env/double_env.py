"""A user-written environment: doubling numbers, posed to the model as additions.

The data rows say `double 17` / `34`; the env turns a row into the prompt the model knows (`17+17=`)
and scores the completion: 1.0 for the right number, plus a small bonus for answering with a number
at all. Sub-scores show up in wandb as `reward/DoubleEnv/correct` and `.../is_number`, and the env's
metrics under `env/double/...`.

Trained from the repository root with `tidal train examples/custom_env/config.yaml`.
"""

from __future__ import annotations

import re
from typing import Any

from tidal.envs import Env
from tidal.rewards import RewardResult
from tidal.types import Sample


class DoubleEnv(Env):
    def __init__(self, format_bonus: float = 0.1) -> None:
        self.format_bonus = format_bonus

    def prompt(self, row: dict[str, Any]) -> str:
        match = re.search(r"\d+", row["prompt"])
        if match is None:
            raise ValueError(f"no number in {row['prompt']!r}")
        n = int(match.group())
        return f"{n}+{n}="

    def score(self, sample: Sample, row: dict[str, Any]) -> RewardResult:
        text = sample.text.strip()
        correct, is_number = text == row["answer"], text.isdigit()
        return RewardResult(float(correct) + self.format_bonus * is_number,
                            {"correct": float(correct), "is_number": float(is_number)})

    def is_correct(self, sample: Sample, row: dict[str, Any]) -> bool:
        return sample.text.strip() == row["answer"]
