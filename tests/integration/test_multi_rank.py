"""The trainer as two DeepSpeed ranks on Ray (gloo): the parameters one rank reaches on the same
batches, at ZeRO 0, 2 and 3, and the group's failure handling. The two-rank `tidal train` run end to
end is tests/integration/test_train.py's run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from tidal.config import RunConfig, load_config
from tidal.model.loading import load_model, materialize_preset
from tidal.model.lora import is_adapter
from tidal.rollout.worker import RolloutWorker, WorkerConfig
from tidal.telemetry.metrics import PeakRSS, values
from tidal.trainer.actor import TrainerActor, TrainerActorConfig
from tidal.trainer.group import TrainerGroup
from tidal.types import Group, Prompt

pytestmark = pytest.mark.integration

WAIT_S = 300.0
"""Bound of every wait: a rank stuck in a collective fails the test instead of hanging CI."""
PROBLEMS = [("12+7=", "19"), ("3-5=", "-2"), ("40+2=", "42")]
ROWS = [Prompt(i, {"prompt": p, "answer": a}) for i, (p, a) in enumerate(PROBLEMS)]
OVERRIDES = [
    "model.preset=tiny-qwen3-moe",
    "rollout.group_size=3",
    "rollout.max_new_tokens=4",
    "trainer.micro_batch_size=2",
    "trainer.lr=1e-3",
    "monitor.wandb=disabled",
    "algorithm.minibatches=2",
    "algorithm.loss.kl.coef=0.01",
]
"""3 groups of 3: 9 rows in minibatches of 4 and 5, so with two ranks one share of 5 rows is padded."""
STEPS = 3
TOLERANCE = 3e-5
"""Largest parameter difference allowed between one and two ranks at the same ZeRO stage after STEPS
batches (6 AdamW steps at lr 1e-3, which move parameters by 6e-3). Measured on this machine: 3.0e-6
(ZeRO-0), 8.6e-6 (ZeRO-2), 7.6e-6 (ZeRO-3): floats summed in another order (each rank's micro-batches,
the all-reduce), which AdamW's division by sqrt(v) enlarges where gradients are tiny. One rank at
ZeRO-3 differs from one rank at ZeRO-0 by 2.2e-5 for the same reason."""


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_preset("tiny-qwen3-moe", seed=0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # Actors import this module's trainer subclass by name. Allocations over 1 MB are mapped and
    # unmapped by glibc (no adaptive threshold keeping freed blocks resident), so an actor's resident
    # memory follows what it holds and the publish's peak is measurable.
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    ray.init(runtime_env={"env_vars": env})  # the session's runtime (tests/conftest.py), as a job of its own
    yield
    ray.shutdown()


def config(*extra: str) -> RunConfig:
    return load_config(None, [*OVERRIDES, *extra]).for_rl()


@pytest.fixture(scope="module")
def groups(preset: Path) -> list[Group]:
    """Version-0 groups with rewards set by hand (a random model scores 0), so GRPO has signal."""
    threads = torch.get_num_threads()
    out = RolloutWorker(WorkerConfig.of(config()), str(preset)).rollout(ROWS, seed=0).groups
    torch.set_num_threads(threads)
    for g in out:
        for j, s in enumerate(g.samples):
            s.reward = float((j + g.group_id) % 2)
    return out


def train(preset: Path, groups: list[Group], *extra: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """(published weights, rank 0's metrics per step) after STEPS steps on `groups`."""
    cfg = config(*extra)
    group = TrainerGroup(TrainerActor, cfg.trainer, (TrainerActorConfig.of(cfg), str(preset)), WAIT_S)
    try:
        metrics = []
        for _ in range(STEPS):
            results = ray.get(group.call("step", groups), timeout=WAIT_S)
            assert len({r.version for r in results}) == 1  # the ranks step in lockstep
            metrics.append(values(results[0].metrics))
        state, _ = ray.get(group.call("snapshot"), timeout=WAIT_S)[0]
        return state, metrics
    finally:
        group.close()


# Per commit ZeRO-3 (partitioned parameters: the most that can differ from one rank); 0 and 2 in the slow tier.
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_two_ranks_train_like_one(cluster: None, preset: Path, groups: list[Group], stage: int) -> None:
    reference, ref_metrics = train(preset, groups, f"trainer.zero_stage={stage}")
    state, metrics = train(preset, groups, "trainer.num_ranks=2", f"trainer.zero_stage={stage}")
    start = load_model(str(preset)).state_dict()
    assert state.keys() == reference.keys()
    diff = max((state[k] - reference[k]).abs().max().item() for k in reference)
    moved = max((reference[k] - start[k]).abs().max().item() for k in reference)
    print(f"ZeRO-{stage}, 2 ranks vs 1: largest parameter difference {diff:.2e} (the steps moved them {moved:.2e})")
    assert diff < TOLERANCE and moved > 100 * TOLERANCE
    for m, ref in zip(metrics, ref_metrics, strict=True):
        # Whole-batch statistics: every rank all-gathers pi_old, so they are the batch's, not a share's.
        assert m["train/samples"] == ref["train/samples"] == 9
        assert m["perf/train_tokens"] == ref["perf/train_tokens"]
        # The loss and gradient norm scale with the denominator (AdamW's update barely does).
        for key in ("train/loss", "train/grad_norm", "offpolicy/m2", "offpolicy/ess", "train/kl"):
            assert m[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


# In the slow tier; per commit test_lora.py trains LoRA at ZeRO-3 on one rank, and test_two_ranks_train_like_one
# trains two.
@pytest.mark.slow
def test_two_ranks_train_lora_like_one(cluster: None, preset: Path, groups: list[Group]) -> None:
    """LoRA on attention and the experts at ZeRO-3 (the frozen base partitioned, the adapters trained,
    the KL reference the base with its adapters off): two ranks reach one rank's adapters."""
    extra = ("trainer.zero_stage=3", "model.lora={r: 4}")
    reference, ref_metrics = train(preset, groups, *extra)
    state, metrics = train(preset, groups, "trainer.num_ranks=2", *extra)
    assert state.keys() == reference.keys() and all(is_adapter(k) for k in state)
    diff = max((state[k] - reference[k]).abs().max().item() for k in reference)
    moved = max(t.abs().max().item() for k, t in reference.items() if ".lora_B." in k)  # lora_B starts at 0
    print(f"LoRA at ZeRO-3, 2 ranks vs 1: largest adapter difference {diff:.2e} (lora_B moved {moved:.2e})")
    assert diff < TOLERANCE and moved > 100 * TOLERANCE
    for m, ref in zip(metrics, ref_metrics, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/kl"):
            assert m[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert metrics[-1]["train/kl"] > 0  # the adapters moved the policy off its base


def test_a_group_that_cannot_be_placed_fails_with_one_line(cluster: None, preset: Path) -> None:
    from tidal.runtime import RunError

    cfg = config("trainer.num_ranks=2", "trainer.num_cpus=5")  # 10 CPUs on a cluster of 8
    with pytest.raises(RunError, match=r"cannot place trainer.num_ranks=2 ranks of \{'CPU': 5.0\}"):
        TrainerGroup(TrainerActor, cfg.trainer, (TrainerActorConfig.of(cfg), str(preset)), timeout_s=2)


class FullCopyTrainer(TrainerActor):
    """The real trainer actor, which can also measure building a whole fp32 copy (the publish of before)."""

    def full_copy_peak(self) -> int | None:
        with PeakRSS() as peak:
            state = self.trainer.state_dict_for_export()
        del state
        return peak.growth


@pytest.fixture(scope="module")
def wide_model(preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The preset's architecture widened to ~140 MB of fp32 weights (random init), with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tidal.model.loading import load_tokenizer

    config = AutoConfig.from_pretrained(
        preset,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    load_tokenizer(str(preset)).save_pretrained(out)
    return out


def test_publish_holds_a_bucket_not_the_model(cluster: None, wide_model: Path, tmp_path: Path) -> None:
    """Rank 0 of two at ZeRO-3 publishes through the disk transport in 4 MB buckets: its peak memory
    grows by a few of the largest tensor (a layer's fused experts, 16 MB), not by the model."""
    overrides = [o for o in OVERRIDES if not o.startswith("model.preset")]
    cfg = load_config(
        None,
        [
            *overrides,
            f"model.path={wide_model}",
            "trainer.num_ranks=2",
            "trainer.zero_stage=3",
            "algorithm.loss.kl.coef=0",
            "weight_sync.transport.type=disk",
            f"weight_sync.transport.dir={tmp_path}",
            "weight_sync.bucket_mb=4",
        ],
    ).for_rl()
    model_bytes = sum(t.numel() * 4 for t in load_model(str(wide_model)).state_dict().values())
    group = TrainerGroup(FullCopyTrainer, cfg.trainer, (TrainerActorConfig.of(cfg), str(wide_model)), WAIT_S)
    try:
        (handle, metrics), _ = ray.get(group.call("publish"), timeout=WAIT_S)
        streamed = values(metrics)["perf/publish_peak_mem_mb"] * 2**20
        full = ray.get(group.call("full_copy_peak"), timeout=WAIT_S)[0]
    finally:
        group.close()
    print(
        f"model {model_bytes / 2**20:.0f} MB: publish peak +{streamed / 2**20:.0f} MB, "
        f"whole fp32 copy +{full / 2**20:.0f} MB"
    )
    assert handle.nbytes == model_bytes and len(handle.payload.files) > 10
    # Measured: +46 MB for a 163 MB model, about three copies of the largest tensor (ZeRO-3's gather of
    # it, the bucket holding it, safetensors' bytes of it); a whole copy: +171 MB.
    assert streamed < 4 * 16 * 2**20 and streamed < 0.3 * model_bytes
    assert full > 0.6 * model_bytes  # the measurement does see a whole copy when there is one


# In the slow tier: per commit, test_resume.py resumes a SIGTERM-stopped ZeRO-3 run and
# test_checkpoint_shards.py checks every rank's shard of a two-rank checkpoint.
@pytest.mark.slow
def test_two_ranks_resume_from_a_checkpoint_exactly(
    cluster: None, preset: Path, groups: list[Group], tmp_path: Path
) -> None:
    """ZeRO-3 over two ranks: each rank writes and reads back its own partition of the parameters
    and of the optimizer's moments, sealed as the driver seals them; training on from the checkpoint
    gives the same weights, bit for bit."""
    from tidal import checkpoint

    cfg = config("trainer.num_ranks=2", "trainer.zero_stage=3")

    def run(resume: bool) -> tuple[dict[str, torch.Tensor], int, dict[str, int]]:
        group = TrainerGroup(TrainerActor, cfg.trainer, (TrainerActorConfig.of(cfg), str(preset)), WAIT_S)
        try:
            if resume:
                path = str(checkpoint.latest_checkpoint(tmp_path) / checkpoint.TRAINER)
                assert ray.get(group.call("load_state", path), timeout=WAIT_S) == [2, 2]  # two minibatches a step
            else:
                ray.get(group.call("step", groups), timeout=WAIT_S)
                tmp = checkpoint.begin(tmp_path, 1)
                shards = ray.get(group.call("save_state", str(tmp / checkpoint.TRAINER)), timeout=WAIT_S)
                checkpoint.commit(tmp, keep=1, shards=shards)  # every rank's files are where the driver looks
            for _ in range(2):
                ray.get(group.call("step", groups), timeout=WAIT_S)
            state, version = ray.get(group.call("snapshot"), timeout=WAIT_S)[0]
            return state, version, ray.get(group.rank0.ledger.remote(), timeout=WAIT_S)
        finally:
            group.close()

    (whole, version, ledger), (resumed, version_again, ledger_again) = run(False), run(True)
    assert version == version_again == 6 and ledger == ledger_again == {"trained_groups": 9, "unique_trained_groups": 3}
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


# In the slow tier; per commit test_routing.py replays routing on one rank, and test_two_ranks_train_like_one
# trains two.
@pytest.mark.slow
def test_two_ranks_replay_routing_and_measure_it_like_one(cluster: None, preset: Path) -> None:
    """R3 at ZeRO-3: each rank replays its share's recorded routing; the routing-health metrics,
    summed over ranks, are the whole batch's."""
    threads = torch.get_num_threads()
    groups = (
        RolloutWorker(WorkerConfig.of(config("rollout.record_routing=true")), str(preset)).rollout(ROWS, seed=0).groups
    )
    torch.set_num_threads(threads)
    for g in groups:
        for j, s in enumerate(g.samples):
            s.reward = float((j + g.group_id) % 2)
    assert all(s.routing is not None for g in groups for s in g.samples)
    extra = ("algorithm.routing_replay=r3", "trainer.zero_stage=3")
    reference, ref_metrics = train(preset, groups, *extra)
    state, metrics = train(preset, groups, "trainer.num_ranks=2", *extra)
    assert max((state[k] - reference[k]).abs().max().item() for k in reference) < TOLERANCE
    for m, ref in zip(metrics, ref_metrics, strict=True):
        for key in ("moe/routing_agreement", "moe/routing_any_flip", "moe/routing_agreement_layer0"):
            assert m[key] == pytest.approx(ref[key], abs=1e-9), key
    assert ref_metrics[0]["moe/routing_agreement"] > 0.98  # step 1: the weights that generated the groups
    assert ref_metrics[-1]["moe/routing_agreement"] < ref_metrics[0]["moe/routing_agreement"]  # they moved
