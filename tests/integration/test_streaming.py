"""Streaming rollout: groups enter the buffer as they end, over-sampling fills batches the filter
thins, and deterministic mode keeps each step's prompts fixed.

The engine and worker tests use a random-init tiny MoE with a stop string its samples hit at
varied points (lengths from 5 to 24 tokens), so groups of one generate call end at different steps.
The runs are short real `tidal train` runs (Ray, DeepSpeed, the buffer actor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from tidal.config import FilterConfig, load_config
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.rollout.buffer import TrajectoryBuffer
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.rollout.worker import CONCURRENCY_GROUPS, RolloutWorker, Work, WorkerConfig
from tidal.stages.train import run_train
from tidal.types import Completion, Prompt, SamplingParams

pytestmark = pytest.mark.integration

# Actor subclasses defined here travel to Ray's workers by value (this file is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STOP = ["1"]  # the random model writes a "1" at varied points: ragged lengths


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=0)


def test_engine_reports_each_row_the_step_it_ends(preset: Path) -> None:
    tok = load_tokenizer(preset)
    engine = TransformersEngine(load_model(preset), tok)
    prompts = [tok.encode(f"{i}+{i}=", add_special_tokens=False) for i in range(8)]
    ended: list[tuple[int, Completion]] = []
    outs = engine.generate(
        prompts,
        SamplingParams(temperature=1.0, max_new_tokens=24, seed=0, stop=STOP),
        on_finish=lambda i, c: ended.append((i, c)),
    )
    assert sorted(i for i, _ in ended) == list(range(8))  # each row once
    lengths = [len(c.token_ids) for _, c in ended]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]  # in the order they ended
    for i, c in ended:
        assert c == outs[i]  # what was reported early is the completion returned


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"])
def test_rows_admitted_mid_generation_decode_as_if_alone(preset: Path, name: str) -> None:
    """Continuous batching in the transformers engine: rows that join a running batch at a chunk
    boundary (their prompts prefilled, KV caches merged, longer or shorter than the batch's) decode
    exactly as they would alone, and so do the rows already running (greedy, log-probs to 1e-4)."""
    path = materialize_preset(name, seed=0)
    tok = load_tokenizer(path)
    engine = TransformersEngine(load_model(path), tok)
    texts = ["12+34=", "7", "The sum of 45 and 99 is", "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "8+8="]
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    joins = [[(prompts[2], 10), (prompts[3], 6)], [], [(prompts[4], 10)]]
    seen: list[int] = []

    def admit(running: int) -> list[tuple[list[int], int]]:
        seen.append(running)
        return joins.pop(0) if joins else []

    outs = engine.generate(prompts[:2], params, chunk_tokens=3, admit=admit)
    # Rows running at each boundary (steps 3, 6, 9): two; four after two joined; three, the 6-token one done.
    assert seen[:3] == [2, 4, 3]
    assert [len(o.token_ids) for o in outs] == [10, 10, 10, 6, 10]
    for prompt, out in zip(prompts, outs, strict=True):
        (alone,) = engine.generate([prompt], params, max_tokens=[len(out.token_ids)])
        assert out.prompt_ids == prompt and out.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, alone.logprobs, strict=True)) < 1e-4


def test_a_group_is_in_the_buffer_before_the_slowest_of_its_call_ends(preset: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.preset=tiny-qwen3-moe",
            f"output_dir={tmp_path}",
            "rollout.max_new_tokens=24",
            "rollout.group_size=1",
            "rollout.batch_size=64",
            f"rollout.stop={json.dumps(STOP)}",
        ],
    )
    ray.init()  # the session's runtime (tests/conftest.py)
    try:
        buffer = ray.remote(max_concurrency=4)(TrajectoryBuffer).remote(FilterConfig(zero_variance=False), 0)
        worker = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutWorker).remote(
            WorkerConfig.of(cfg), str(preset), 0, buffer
        )
        serving = worker.serve.remote()
        prompts = [Prompt(i, {"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(8)]
        ray.get(buffer.dispatched.remote(1, len(prompts)))
        ray.get(worker.submit.remote(Work(prompts, batch_id=1, min_version=0)))
        assert ray.get(buffer.wait_ready.remote(1, 0, 120.0)).ready
        groups = ray.get(buffer.state.remote())["batches"][1]  # in the order they were put
        ray.get(worker.stop.remote())
        ray.get(serving, timeout=60)
    finally:
        ray.shutdown()
    # One generate call made all 8 samples (groups of one); each group went into the buffer when its
    # sample ended, so the buffer holds them by length: the first long before the call's last token.
    assert sorted(g.group_id for g in groups) == list(range(8))
    ends = [max(len(s.response_ids) for s in g.samples) for g in groups]
    assert ends == sorted(ends) and ends[0] < ends[-1], ends


def run(tmp: Path, name: str, *overrides: str, worker_cls: type | None = None) -> dict[str, Any]:
    cfg = load_config(
        None,
        [
            "model.preset=tiny-qwen3-moe",
            "data.source.ops=[+]",
            "data.source.eval_size=8",
            f"name={name}",
            f"output_dir={tmp / 'runs'}",
            "rollout.max_new_tokens=4",
            "rollout.group_size=4",
            "rollout.prompts_per_step=8",
            "rollout.num_workers=2",
            "rollout.max_staleness=1",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=32",
            "train.eval_every=0",
            "eval.num_samples=8",
            "eval.max_new_tokens=4",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
            "train.steps=6",
            *overrides,
        ],
    )
    summary = run_train(cfg, worker_cls=worker_cls)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    schedule = [json.loads(line) for line in (cfg.run_dir / "schedule.jsonl").read_text().splitlines()]
    return {"cfg": cfg, "summary": summary, "steps": [r for r in rows if "train/version" in r], "schedule": schedule}


COIN_REWARD = """
import zlib

def coin(sample, row):
    return float(zlib.crc32(f"{sample.group_id} {sample.text}".encode()) % 2)
"""


def test_over_sampling_keeps_every_batch_full(preset: Path, tmp_path: Path, ledger_balances) -> None:
    # A fair coin per sample: 1 group in 8 has equal rewards and is filtered; each is replaced.
    (tmp_path / "coin.py").write_text(COIN_REWARD)
    out = run(
        tmp_path,
        "oversample",
        f"rewards.functions=[{{path: '{tmp_path / 'coin.py'}:coin'}}]",
        "filter.max_oversample=1.0",
    )
    s, steps = out["summary"], out["steps"]
    assert s["ledger/filtered_groups"] > 0  # without replacements the last steps would be short
    assert [r["train/groups"] for r in steps] == [8.0] * 6
    oversampled = sum(r["rollout/oversampled_groups"] for r in steps)
    # One new prompt per group that will train nothing, within the cap: each filtered one, and each
    # one streaming dropped as too stale (a slow worker's group that fresher ones overtook).
    assert oversampled == s["ledger/filtered_groups"] + s["ledger/dropped_stale_groups"]
    ledger_balances(s, steps, 6, 8)
    assert s["ledger/trained_groups"] == 6 * 8


class DawdlingWorker(RolloutWorker):
    """The real worker, sleeping a random while (up to 0.5 s) before each batch: timing that
    differs from run to run."""

    def rollout(self, *args: Any, **kwargs: Any) -> Any:
        import random
        import time

        time.sleep(random.uniform(0.0, 0.5))
        return super().rollout(*args, **kwargs)


def test_deterministic_mode_trains_each_batch_at_its_step(preset: Path, tmp_path: Path, ledger_balances) -> None:
    from safetensors.torch import load_file

    args = ("rollout.deterministic=true", "filter.zero_variance=false", "train.save_checkpoint=true")
    out = run(tmp_path, "deterministic", *args)
    for row in out["schedule"]:
        step = row["step"]
        assert sorted(g["id"] for g in row["groups"]) == list(range(8 * (step - 1), 8 * step)), row
        assert {g["batch"] for g in row["groups"]} == {step} and {g["worker"] for g in row["groups"]} == {0, 1}
        # Batch s is dispatched at step s - 1 (one ahead: max_staleness 1) when v(s - 2) is the newest
        # published, and generated with exactly that version, whenever the worker gets to it.
        assert all(g["versions"] == [max(step - 2, 0)] for g in row["groups"]), row
    ledger_balances(out["summary"], out["steps"], 6, 8)
    assert out["summary"]["ledger/taken_groups"] == 6 * 8 and out["summary"]["ledger/in_flight_groups"] == 0
    # Timing does not matter: workers that dawdle at random give the same run, bit for bit.
    again = run(tmp_path, "deterministic-dawdling", *args, worker_cls=DawdlingWorker)
    assert again["schedule"] == out["schedule"]
    assert [r["train/loss"] for r in again["steps"]] == [r["train/loss"] for r in out["steps"]]
    params, params_again = (load_file(o["summary"]["checkpoint"] + "/model.safetensors") for o in (out, again))
    assert params.keys() == params_again.keys()
    assert all(torch.equal(params[k], params_again[k]) for k in params)
