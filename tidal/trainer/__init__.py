"""The trainer processes: N DeepSpeed ranks as Ray actors (`actor`, `group`), what they set up
(`prepare`), the DeepSpeed engine (`engine`), the RL step (`rl`), losses, advantages and off-policy
corrections."""

import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # The accelerator DeepSpeed falls back to anyway, named before any module here imports DeepSpeed
    # so that importing it does not warn on the user's terminal that no GPU was found (ranks and
    # actors inherit the choice).
    os.environ["DS_ACCELERATOR"] = "cpu"
