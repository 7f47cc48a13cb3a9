"""GLM-5 sparse attention gives the same log-probs whichever way a sequence is run.

The tiny-glm5-moe preset (index_topk 64, 4 indexer heads) leaves about 6% of indexer scores at
exactly 0, so without tidal.model.patches' tie-stable top-k these tests fail by 1e-2 to 1.
"""

import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from tidal.model.loading import build_char_tokenizer, load_model, materialize_preset, preset_config
from tidal.model.patches import apply_model_fixes

pytestmark = pytest.mark.integration

TOL = 1e-4  # fp32; the fixed model reaches ~1e-6, a changed top-k selection 1e-2 or more
NUM_SPECIAL = 6  # token ids below this are special tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedModel:
    path = materialize_preset("tiny-glm5-moe", seed=0, root=tmp_path_factory.mktemp("presets"))
    model = load_model(path).eval()
    assert model.config.index_topk == 64
    return model


def _random_ids(model: PreTrainedModel, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(NUM_SPECIAL, model.config.vocab_size, (batch, length), generator=gen)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as `generate` builds them."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def _full(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(ids, attention_mask=mask, position_ids=_positions(mask)).logits.log_softmax(-1)


@torch.no_grad()
def _cached(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, prefill: int) -> torch.Tensor:
    """Log-probs from a prefill of `prefill` tokens, then one token per step with a DynamicCache."""
    cache, pos, out = DynamicCache(config=model.config), _positions(mask), []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        step = model(
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=pos[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )
        out.append(step.logits.log_softmax(-1))
    return torch.cat(out, dim=1)  # (B, T, V)


def _max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_cached_decode_matches_full_forward(model: PreTrainedModel) -> None:
    ids = _random_ids(model, batch=4, length=100)
    mask = torch.ones_like(ids)
    # Selection is sparse from position 64 on; decoding from 48 covers it and the prefill boundary.
    gap = _max_gap(_cached(model, ids, mask, prefill=48), _full(model, ids, mask))
    assert gap < TOL, f"cached decode vs full forward: max |Δ log-prob| {gap:.3g}"


def test_prefix_forward_matches_longer_forward(model: PreTrainedModel) -> None:
    ids = _random_ids(model, batch=4, length=100, seed=1)
    mask = torch.ones_like(ids)
    gap = _max_gap(_full(model, ids[:, :80], mask[:, :80]), _full(model, ids, mask)[:, :80])
    assert gap < TOL, f"first 80 tokens alone vs inside 100: max |Δ log-prob| {gap:.3g}"


def test_left_padded_batch_matches_unpadded_sequences(model: PreTrainedModel) -> None:
    ids = _random_ids(model, batch=2, length=100, seed=2)
    pad = 12  # the second sequence is 88 tokens, left-padded to 100
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = model.config.pad_token_id

    full = _full(model, ids, mask)
    cached = _cached(model, ids, mask, prefill=48)
    for row, start in [(0, 0), (1, pad)]:
        alone_ids = ids[row : row + 1, start:]
        alone = _full(model, alone_ids, torch.ones_like(alone_ids))[0]
        gap_full, gap_cached = _max_gap(full[row, start:], alone), _max_gap(cached[row, start:], alone)
        assert gap_full < TOL, f"row {row}: padded forward vs alone, max |Δ log-prob| {gap_full:.3g}"
        assert gap_cached < TOL, f"row {row}: padded decode vs alone, max |Δ log-prob| {gap_cached:.3g}"


def test_fix_selects_as_upstream_when_scores_do_not_tie() -> None:
    # With 32 indexer heads no score is exactly 0, so the fix must not change a single logit: this
    # catches a transformers upgrade that changes GlmMoeDsaIndexer.forward under our copy of it.
    config = preset_config("tiny-glm5-moe", build_char_tokenizer())
    config.index_n_heads = 32
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = _random_ids(model, batch=2, length=100, seed=3)
    mask = torch.ones_like(ids)
    upstream = _full(model, ids, mask)
    apply_model_fixes(model)
    assert _max_gap(_full(model, ids, mask), upstream) == 0.0


def test_fix_leaves_other_architectures_alone(tmp_path: Path) -> None:
    model = load_model(materialize_preset("tiny-qwen3-moe", seed=0, root=tmp_path))
    assert not [name for name, m in model.named_modules() if type(m).__module__ == "tidal.model.patches"]


def test_fixed_model_survives_pickle(model: PreTrainedModel) -> None:
    ids = _random_ids(model, batch=1, length=100, seed=4)
    mask = torch.ones_like(ids)
    clone = pickle.loads(pickle.dumps(model))
    assert _max_gap(_full(clone, ids, mask), _full(model, ids, mask)) == 0.0
