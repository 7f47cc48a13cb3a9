"""MoE routing records of the transformers engine, on every tiny MoE preset: each token fed to
the model gets the experts of every MoE layer that generation routed it to, prompt tokens included,
rows joining mid-call (continuous batching) included; they are what a plain forward of the same
tokens routes to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tidal.models import load_model, load_tokenizer, materialize_preset
from tidal.rollout.engine import TransformersEngine
from tidal.routing import RoutingRecorder, moe_routers
from tidal.types import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = ["12+7=", "3-5=", "40+2=", "9+9="]
LATE = ["100-1=", "7+8="]
PRESETS = ["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("TIDAL_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("preset", PRESETS)
def test_generation_records_the_routing_a_forward_of_its_tokens_takes(preset: str) -> None:
    path: Path = materialize_preset(preset, seed=0)
    model, tok = load_model(path), load_tokenizer(path)
    engine = TransformersEngine(model, tok)
    routers = moe_routers(model)
    layers, top_k = len(routers), routers[0].top_k
    assert layers == model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    prompts = [tok.encode(p) for p in PROMPTS]
    late = [[tok.encode(p), 6] for p in LATE]
    admitted = []

    def admit(running: int) -> list:
        out, late[:] = late[:], []
        admitted.extend(out)
        return out

    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    outs = engine.generate(prompts, params, record_routing=True, chunk_tokens=2, admit=admit)
    assert len(outs) == len(PROMPTS) + len(LATE) and admitted  # two rows joined the running batch
    agree = total = 0
    with RoutingRecorder(model) as recorder:
        for c in outs:
            fed = c.prompt_ids + c.token_ids[:-1]  # the last sampled token is never fed back
            assert c.routing is not None and c.routing.dtype == torch.uint8
            assert c.routing.shape == (len(fed), layers, top_k)
            with torch.no_grad():
                model(input_ids=torch.tensor([fed]))
            plain = recorder.take()
            same = (c.routing.sort(-1).values == plain.sort(-1).values).all(-1)  # (tokens, layers)
            agree, total = agree + int(same.sum()), total + same.numel()
    # Cached decoding and one forward sum floats in another order: a near tie may flip, rarely.
    assert agree / total > 0.98, (agree, total)
    assert engine.generate(prompts[:1], params)[0].routing is None  # recorded only when asked
