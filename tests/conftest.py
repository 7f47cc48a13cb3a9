import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep wandb quiet and local in every test; presets are cached per user as in normal use.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Every test's Ray cluster is local and its own. Ray caches the auth mode per process, so one test
# clusters with token auth and another without would fail to start each other's GCS; none uses it.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture
def repo() -> Path:
    return REPO
