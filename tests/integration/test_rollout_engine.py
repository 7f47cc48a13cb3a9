"""TransformersEngine on CPU with tiny MoE presets: behavior log-probs equal a teacher-forced forward
pass (with eager and sdpa attention), greedy decoding is batch-invariant and equals HF `generate`,
stops, per-row token limits and finish reasons, seeds, and sampled tokens stay inside the top-k /
top-p set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tidal.model.forward import completion_logprobs, logp_mismatch
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.types import Completion, SamplingParams

pytestmark = pytest.mark.integration

PRESETS = ["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"]
ATTENTION = ["eager", "sdpa"]
# Prompts of 1, 6 and 13 tokens (the tokenizer is character level), so the batch is left-padded.
TEXTS = ["7", "12+34=", "hello, world!"]
TOL = 1e-4
ATTENTION_TOL = 1e-5
"""fp32 log-probs of the same tokens under eager and sdpa attention: ~1e-6 measured on every preset
(torch 2.13, CPU); bf16 differs by ~0.1, the rounding of bf16 itself."""


@dataclass
class Loaded:
    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    engine: TransformersEngine
    prompts: list[list[int]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Matrices this small gain nothing from a second thread, and on a shared 2-core machine
    # oversubscribed OpenMP threads make each forward ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name: str, tmp_path_factory: pytest.TempPathFactory, attn_implementation: str | None = None) -> Loaded:
    path = materialize_preset(name, seed=0)
    model, tok = load_model(path, attn_implementation=attn_implementation), load_tokenizer(path)
    prompts = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    assert [len(p) for p in prompts] == [1, 6, 13]
    return Loaded(model, tok, TransformersEngine(model, tok), prompts)


@pytest.fixture(scope="module", params=PRESETS)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return load(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=PRESETS)
def by_attention(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Loaded]:
    """One preset loaded with each attention implementation."""
    return {attn: load(request.param, tmp_path_factory, attn) for attn in ATTENTION}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """For the checks that do not depend on the architecture."""
    return load("tiny-qwen3-moe", tmp_path_factory)


@torch.no_grad()
def reference_logits(model: PreTrainedModel, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), V) fp32 logits that predict each completion token: one forward pass of the
    row alone, no padding, no cache."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def reference_logprobs(model: PreTrainedModel, c: Completion, temperature: float) -> torch.Tensor:
    logits = reference_logits(model, c.prompt_ids, c.token_ids) / (temperature or 1.0)
    return logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)


def first_plain_token(tok: PreTrainedTokenizerBase, ids: list[int], start: int) -> int:
    """Index of the first token at or after `start` that decodes to visible text (not a special token)."""
    special = set(tok.all_special_ids)
    return next(i for i in range(start, len(ids)) if ids[i] not in special and tok.decode([ids[i]]).strip())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=40, seed=0),
        SamplingParams(temperature=0.0, max_new_tokens=40),
    ],
    ids=["sampled", "greedy"],
)
def test_behavior_logprobs_equal_teacher_forced(loaded: Loaded, params: SamplingParams) -> None:
    m = loaded
    first = m.engine.generate(m.prompts, params)
    # Stop the longest row early on one of its own tokens, so completions are ragged as well as
    # prompts: a finished row is fed padding while the others keep decoding.
    row = max(range(len(first)), key=lambda i: len(first[i].token_ids))
    stop_id = first[row].token_ids[first_plain_token(m.tok, first[row].token_ids, 8)]
    params = SamplingParams(**{**vars(params), "stop_token_ids": [stop_id]})
    out = m.engine.generate(m.prompts, params)
    lengths = [len(c.token_ids) for c in out]
    assert out[row].finish_reason == "stop" and out[row].token_ids[-1] == stop_id
    assert len(set(lengths)) > 1 and sum(lengths) >= 50, lengths

    for c in out:
        assert len(c.logprobs) == len(c.token_ids)
        ref = reference_logprobs(m.model, c, params.temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=TOL, rtol=0)
    # The trainer's recompute (one right-padded forward of the whole batch) agrees as well.
    recomputed = completion_logprobs(
        m.model, m.prompts, [c.token_ids for c in out], m.engine.pad_id, params.temperature
    )
    behavior = torch.tensor([lp for c in out for lp in c.logprobs])
    assert logp_mismatch(behavior, torch.cat(recomputed))["logp_mismatch_max"] < TOL


def test_every_preset_defaults_to_sdpa(loaded: Loaded) -> None:
    """`load_model`'s default attention: every preset's model class supports sdpa."""
    assert loaded.model.config._attn_implementation == "sdpa"


def test_default_attention_is_eager_where_the_model_class_lacks_sdpa(
    qwen: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default falls back to eager for a model class without sdpa; asking for sdpa is an error."""
    cls = type(qwen.model)
    monkeypatch.setattr(cls, "_supports_sdpa", False)
    path = materialize_preset("tiny-qwen3-moe", seed=0)
    assert load_model(path).config._attn_implementation == "eager"
    assert load_model(path, attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        load_model(path, attn_implementation="sdpa")


@pytest.mark.parametrize("attn", ATTENTION)
def test_behavior_logprobs_per_attention(by_attention: dict[str, Loaded], attn: str) -> None:
    """Generation log-probs equal teacher-forced ones with either attention implementation, and the
    other implementation scores the same tokens within ATTENTION_TOL. 13 + 60 tokens run past GLM-5's
    index_topk (64), so its sparse attention selects a strict subset of the keys."""
    m, other = by_attention[attn], by_attention[next(a for a in ATTENTION if a != attn)]
    assert m.model.config._attn_implementation == attn
    params = SamplingParams(temperature=0.7, max_new_tokens=60, seed=0, ignore_eos=True)
    out = m.engine.generate(m.prompts, params)
    assert max(len(c.prompt_ids) + len(c.token_ids) for c in out) > getattr(m.model.config, "index_topk", 0)
    for c in out:
        torch.testing.assert_close(torch.tensor(c.logprobs), reference_logprobs(m.model, c, 0.7), atol=TOL, rtol=0)
    behavior = torch.tensor([lp for c in out for lp in c.logprobs])
    for model, tol in ((m.model, TOL), (other.model, ATTENTION_TOL)):
        recomputed = completion_logprobs(model, m.prompts, [c.token_ids for c in out], m.engine.pad_id, 0.7)
        assert logp_mismatch(behavior, torch.cat(recomputed))["logp_mismatch_max"] < tol


def test_sampled_logprobs_are_of_the_untruncated_distribution(qwen: Loaded) -> None:
    # Under the top-2 distribution sampled from, each token's log-prob is about log(1/2); under the
    # full softmax over ~100 tokens of a random model, the contract's one, all are below -2.
    params = SamplingParams(temperature=1.0, top_k=2, max_new_tokens=20, seed=0)
    out = qwen.engine.generate(qwen.prompts, params)
    lps = torch.tensor([lp for c in out for lp in c.logprobs])
    assert lps.max() < -2.0


def test_greedy_alone_equals_its_row_in_a_padded_batch(loaded: Loaded) -> None:
    m = loaded
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    batch = m.engine.generate(m.prompts, params)
    for prompt, row in zip(m.prompts, batch, strict=True):
        alone = m.engine.generate([prompt], params)[0]
        assert alone.token_ids == row.token_ids
        assert alone.finish_reason == row.finish_reason
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(row.logprobs), atol=TOL, rtol=0)


@torch.no_grad()
def test_greedy_equals_hf_generate(loaded: Loaded) -> None:
    m = loaded
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    for prompt in m.prompts[1:]:
        ours = m.engine.generate([prompt], params)[0]
        hf = m.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=40,
            pad_token_id=m.tok.pad_token_id,
        )[0, len(prompt) :].tolist()
        assert ours.token_ids == hf
        assert len(ours.token_ids) > 10


def test_per_row_token_limits(qwen: Loaded) -> None:
    """Each row stops at its own limit with finish reason "length", as it does generated alone with
    that limit, and stops costing compute there; the limits replace `params.max_new_tokens` (17 > 8)."""
    m = qwen
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    limits = [3, 17, 9]
    rows_per_forward: list[int] = []

    def count(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows_per_forward.append(kwargs["input_ids"].shape[0])

    hook = m.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        out = m.engine.generate(m.prompts, params, max_tokens=limits)
    finally:
        hook.remove()
    # Finished rows leave the batch: after the prompts' forward, the decode forwards process each
    # row until its last token (3 rows x 2 steps, 2 x 6, 1 x 8), not 3 rows x 16 steps.
    assert rows_per_forward[0] == 3 and sum(rows_per_forward[1:]) == sum(limits) - len(limits)
    for prompt, c, n in zip(m.prompts, out, limits, strict=True):
        assert len(c.token_ids) == len(c.logprobs) == n and c.finish_reason == "length"
        alone = m.engine.generate([prompt], SamplingParams(**{**vars(params), "max_new_tokens": n}))[0]
        assert c.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=TOL, rtol=0)
    # A stop still ends a row before its limit.
    stop_id = out[1].token_ids[first_plain_token(m.tok, out[1].token_ids, 4)]
    stopped = m.engine.generate(
        m.prompts, SamplingParams(**{**vars(params), "stop_token_ids": [stop_id]}), max_tokens=limits
    )
    assert stopped[1].finish_reason == "stop" and stopped[1].token_ids[-1] == stop_id
    assert len(stopped[1].token_ids) < 17
    with pytest.raises(ValueError, match="one limit >= 1 per prompt"):
        m.engine.generate(m.prompts, params, max_tokens=[3, 4])
    with pytest.raises(ValueError, match="one limit >= 1 per prompt"):
        m.engine.generate(m.prompts, params, max_tokens=[3, 0, 4])


def test_finish_reason_length(qwen: Loaded) -> None:
    out = qwen.engine.generate(qwen.prompts, SamplingParams(temperature=0.0, max_new_tokens=7))
    for c in out:
        assert qwen.tok.eos_token_id not in c.token_ids
        assert len(c.token_ids) == len(c.logprobs) == 7
        assert c.finish_reason == "length"
        assert c.text == qwen.tok.decode(c.token_ids, skip_special_tokens=True)


def test_stop_string_ends_the_completion_right_after_it(qwen: Loaded) -> None:
    m = qwen
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    greedy = m.engine.generate(m.prompts, params)
    ids = greedy[2].token_ids
    for width in (1, 2):  # a one-character and a two-character stop string
        j = first_plain_token(m.tok, ids, 5)
        stop = m.tok.decode(ids[j : j + width])
        assert len(stop) == width
        # Where the greedy text first contains the stop string, the stopped completion must end.
        end = next(k for k in range(1, len(ids) + 1) if stop in m.tok.decode(ids[:k], skip_special_tokens=True))
        out = m.engine.generate(m.prompts, SamplingParams(**{**vars(params), "stop": [stop]}))
        assert out[2].finish_reason == "stop"
        assert out[2].token_ids == ids[:end]
        assert out[2].text.endswith(stop) and out[2].text.count(stop) == 1
        # A row whose text never contains the stop string runs to the length limit, unchanged.
        for g, c in zip(greedy, out, strict=True):
            if stop not in g.text:
                assert c.finish_reason == "length" and c.token_ids == g.token_ids


def test_stop_token_ids(qwen: Loaded) -> None:
    m = qwen
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    greedy = m.engine.generate(m.prompts, params)
    ids = greedy[0].token_ids
    stop_id = ids[first_plain_token(m.tok, ids, 5)]
    out = m.engine.generate(m.prompts, SamplingParams(**{**vars(params), "stop_token_ids": [stop_id]}))
    for g, c in zip(greedy, out, strict=True):
        if stop_id in g.token_ids:
            end = g.token_ids.index(stop_id) + 1
            assert c.finish_reason == "stop" and c.token_ids == g.token_ids[:end]
        else:
            assert c.finish_reason == "length" and c.token_ids == g.token_ids
    assert out[0].finish_reason == "stop" and len(out[0].token_ids) < 30


def test_same_seed_same_samples_other_seed_other_samples(qwen: Loaded) -> None:
    m = qwen
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=123)
    a = m.engine.generate(m.prompts, params)
    b = m.engine.generate(m.prompts, params)
    c = m.engine.generate(m.prompts, SamplingParams(**{**vars(params), "seed": 124}))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # A random model at temperature 1 is close to uniform: two seeds agree on few tokens.
    same = sum(x == y for r, s in zip(a, c, strict=True) for x, y in zip(r.token_ids, s.token_ids, strict=False))
    assert same < 10


def test_unseeded_generate_leaves_the_global_rng_alone(qwen: Loaded) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    qwen.engine.generate(qwen.prompts[:1], params)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5)])
def test_sampled_tokens_stay_in_the_top_k_and_top_p_set(qwen: Loaded, top_k: int, top_p: float) -> None:
    m = qwen
    temperature = 1.5  # flattens the distribution, so many tokens compete at the boundary
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=40, seed=7)
    out = m.engine.generate(m.prompts * 2, params)
    ranks = []
    for c in out:
        probs = (reference_logits(m.model, c.prompt_ids, c.token_ids) / temperature).softmax(-1)  # (N, V)
        p_tok = probs.gather(-1, torch.tensor(c.token_ids)[:, None])  # (N, 1)
        # Rank of each sampled token, and the probability mass of the tokens strictly above it.
        above = probs > p_tok + 1e-6
        ranks += above.sum(-1).tolist()
        if top_k:
            assert (above.sum(-1) < top_k).all()
        if top_p < 1.0:
            assert ((probs * above).sum(-1) < top_p + 1e-5).all()
    # Sampling is not collapsed onto the top token: lower ranks are drawn too.
    assert max(ranks) >= (top_k - 1 if top_k else 2)
    assert sum(r == 0 for r in ranks) < 0.8 * len(ranks)


def test_ignore_eos_generates_past_the_end_token(qwen: Loaded) -> None:
    """eos made the only stop: a row that ended at eos goes on to max_new_tokens, its prefix unchanged."""
    m = qwen
    greedy = m.engine.generate(m.prompts, SamplingParams(temperature=0.0, max_new_tokens=30))
    stop_id = greedy[0].token_ids[first_plain_token(m.tok, greedy[0].token_ids, 2)]
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=[stop_id])
    ended = m.engine.generate(m.prompts, params)
    row = 0  # reached the stop id; now make eos the id it stopped at, and ignore it
    m.model.generation_config.eos_token_id, saved = stop_id, m.model.generation_config.eos_token_id
    try:
        kept = m.engine.generate(m.prompts, SamplingParams(temperature=0.0, max_new_tokens=30))
        ignored = m.engine.generate(m.prompts, SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))
    finally:
        m.model.generation_config.eos_token_id = saved
    assert kept[row].token_ids == ended[row].token_ids and kept[row].finish_reason == "stop"
    assert len(ignored[row].token_ids) == 30 and ignored[row].finish_reason == "length"
    assert ignored[row].token_ids[: len(kept[row].token_ids)] == kept[row].token_ids
