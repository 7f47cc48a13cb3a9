import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep wandb quiet and local in every test; presets are cached per user as in normal use.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def repo() -> Path:
    return REPO
