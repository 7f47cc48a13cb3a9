"""MoE routing records of the transformers engine, on every tiny MoE preset: each token fed to
the model gets the experts of every MoE layer that generation routed it to, prompt tokens included,
rows joining mid-call (continuous batching) included; they are what a plain forward of the same
tokens routes to."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from tidal.model.batching import filler_micro, plan_micro_batches
from tidal.model.loading import load_model, load_tokenizer, materialize_preset
from tidal.model.routing import RoutingRecorder, moe_routers
from tidal.rollout.engines.transformers import TransformersEngine
from tidal.telemetry.metrics import values
from tidal.types import SamplingParams

pytestmark = pytest.mark.integration

PROMPTS = ["12+7=", "3-5=", "40+2=", "9+9="]
LATE = ["100-1=", "7+8="]
PRESETS = ["tiny-qwen3-moe", "tiny-glm4-moe", "tiny-glm5-moe"]


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


def test_routing_health_counts_each_flip(tmp_path: Path) -> None:
    """The trainer's routing-health metrics on a batch whose recorded routing is generation's, with
    known flips planted: the agreement drops by exactly them, per layer and per token."""
    from tidal.model.routing import routing_health
    from tidal.telemetry.metrics import values
    from tidal.trainer.rl import build_batch
    from tidal.types import Group, Sample

    path = materialize_preset("tiny-glm4-moe", seed=0)
    model, tok = load_model(path), load_tokenizer(path)
    outs = TransformersEngine(model, tok).generate(
        [tok.encode(p) for p in PROMPTS], SamplingParams(temperature=1.0, max_new_tokens=6, seed=1), record_routing=True
    )
    samples = [
        Sample(
            i // 2,
            c.prompt_ids,
            c.token_ids,
            [1] * len(c.token_ids),
            c.logprobs,
            c.finish_reason,
            0,
            [0] * len(c.token_ids),
            reward=float(i % 2),
            routing=c.routing.clone(),
        )
        for i, c in enumerate(outs)
    ]
    groups = [Group(g, [s.for_training() for s in samples if s.group_id == g]) for g in range(2)]
    batch, _ = build_batch(groups, "grpo", tok.pad_token_id)
    fed = sum(len(c.routing) for c in outs)
    clean = values(routing_health(model, batch, plan_micro_batches(batch, 3, None)))
    assert clean["moe/routing_agreement"] == 1.0 and clean["moe/routing_any_flip"] == 0.0
    # Plant flips: layer 0 of the first 3 tokens of row 0, and layer 1 of token 2 of row 1.
    experts = model.config.n_routed_experts
    batch.routing[0, :3, 0, 0] = (batch.routing[0, :3, 0, :].max(-1).values + 1) % experts
    batch.routing[0, :3, 0, 1] = batch.routing[0, :3, 0, 0]  # a set of one expert twice: not the same set
    batch.routing[1, 2, 1] = torch.tensor([experts - 1, experts - 1], dtype=torch.uint8)
    got = values(routing_health(model, batch, plan_micro_batches(batch, 3, None)))
    layers = len(moe_routers(model))
    assert got["moe/routing_agreement"] == pytest.approx(1 - 4 / (fed * layers))
    assert got["moe/routing_agreement_layer0"] == pytest.approx(1 - 3 / fed)
    assert got["moe/routing_agreement_layer1"] == pytest.approx(1 - 1 / fed)
    assert got["moe/routing_any_flip"] == pytest.approx(4 / fed)
    assert got["moe/rollout_load_violation"] != clean["moe/rollout_load_violation"] >= 0.0  # the flips moved load
    assert got["moe/train_load_violation"] == clean["moe/train_load_violation"]  # the trainer's routing did not
    assert got["moe/routing_bytes_per_token"] == layers * 2
    # Under a token budget (rows grouped by length, each micro-batch trimmed; a filler counts nothing)
    # the same tokens are compared: the same figures.
    budget = plan_micro_batches(batch, 3, int(batch.attention_mask.sum(-1).max()))
    assert len(budget) > len(plan_micro_batches(batch, 3, None))
    assert values(routing_health(model, batch, [*budget, filler_micro(batch)])) == pytest.approx(got)


def test_a_run_logs_routing_health_every_step(tmp_path: Path, ledger_balances) -> None:
    """Routing replay through a real run: `algorithm.routing_replay=r3` turns on the records; workers
    record, the buffer and Ray carry the records, the DeepSpeed trainer compares its own routing
    before each update (the health metrics), then replays the records in its forwards, and in the
    backward's recompute of its checkpointed layers (`trainer.activation_checkpointing`: a recompute
    routed otherwise would stop the step, see test_memory_levers)."""
    import json

    from tidal.config import load_config
    from tidal.stages.train import run_train

    cfg = load_config(
        None,
        [
            "model.preset=tiny-glm4-moe",
            "data.source.ops=[+]",
            "data.source.eval_size=8",
            "name=routing",
            f"output_dir={tmp_path}",
            "rollout.max_new_tokens=4",
            "rollout.group_size=4",
            "rollout.prompts_per_step=4",
            "rollout.max_staleness=0",
            "algorithm.routing_replay=r3",
            "trainer.activation_checkpointing=true",
            "filter.zero_variance=false",
            "train.steps=3",
            "train.eval_every=0",
            "eval.num_samples=4",
            "monitor.wandb=disabled",
            "train.save_checkpoint=false",
        ],
    )
    assert cfg.rollout.record_routing
    summary = run_train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/version" in r]
    assert len(steps) == 3 and all("moe/routing_agreement" in r and "train/loss" in r for r in steps)
    # On-policy and fp32 on both sides: the trainer routes nearly every token as generation did.
    assert all(r["moe/routing_agreement"] > 0.98 for r in steps), [r["moe/routing_agreement"] for r in steps]
    assert all(r["moe/routing_bytes_per_token"] == 3 * 2 for r in steps)  # 3 MoE layers x top-2, one byte each
    ledger_balances(summary, rows, 3, 4)


def test_record_routing_is_refused_where_it_is_not_built_yet() -> None:
    from tidal.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.record_routing needs rollout.engine=transformers for now"):
        load_config(None, ["rollout.engine=vllm", "rollout.record_routing=true"])
    budget = "trainer.max_tokens_per_micro_batch=512"
    with pytest.raises(ConfigError, match="trainer.packing does not keep routing records yet .*routing_replay=r3"):
        load_config(None, ["algorithm.routing_replay=r3", "trainer.packing=true", budget])


def plain_routing(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with RoutingRecorder(model) as recorder, torch.no_grad():
        model(input_ids=ids)
        return recorder.take().long()


@pytest.mark.parametrize("preset", PRESETS)
def test_r3_routes_each_token_to_its_recorded_experts_and_the_router_still_learns(preset: str) -> None:
    from tidal.model.routing import RoutingReplay

    model = load_model(materialize_preset(preset, seed=0))
    layers, top_k, experts = len(moe_routers(model)), moe_routers(model)[0].top_k, moe_routers(model)[0].weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, model.config.vocab_size, (2, 7), generator=g)
    n = ids.numel()
    # Any recorded routing, as a sample whose tokens came from two weight versions would carry.
    recorded = torch.stack(
        [torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(layers)]) for _ in range(n)]
    ).to(torch.uint8)
    replay = torch.rand(n, generator=g) < 0.7
    own = plain_routing(model, ids)
    with RoutingReplay(model, recorded, replay), RoutingRecorder(model) as recorder:
        out = model(input_ids=ids)
        routed = recorder.take().long()
    assert torch.equal(routed[replay], recorded[replay].long())  # every replayed token, every layer
    with RoutingReplay(model, recorded, torch.zeros_like(replay)), RoutingRecorder(model) as recorder:
        model(input_ids=ids)
        assert torch.equal(recorder.take().long(), own)  # tokens not replayed go where the routers send them
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in moe_routers(model))
    assert torch.equal(plain_routing(model, ids), own)  # the routers route by themselves again


@pytest.mark.parametrize("preset", PRESETS)
def test_r3_with_the_routing_the_model_takes_changes_nothing(preset: str) -> None:
    from tidal.model.routing import RoutingReplay

    def loss_and_grads(replayed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = load_model(materialize_preset(preset, seed=0))
        ids = torch.randint(6, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        own = plain_routing(model, ids)
        replay = RoutingReplay(model, own, torch.ones(ids.numel(), dtype=torch.bool))
        with replay if replayed else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    (plain, plain_grads), (r3, r3_grads) = loss_and_grads(False), loss_and_grads(True)
    assert r3 == pytest.approx(float(plain), abs=1e-6) and plain_grads.keys() == r3_grads.keys()
    assert all(torch.allclose(plain_grads[k], r3_grads[k], atol=1e-6) for k in plain_grads)


def test_the_bias_update_balances_a_skewed_load() -> None:
    """GLM's correction bias, moved by the update rule from the step's load, spreads a load skewed
    onto two experts (a bias that favours them, as a drifted checkpoint might have)."""
    from tidal.model.routing import biased_routers, expert_load, update_router_bias

    model = load_model(materialize_preset("tiny-glm4-moe", seed=0))
    ids = torch.randint(6, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    experts = biased_routers(model)[0].weight.shape[0]
    for router in biased_routers(model):
        router.e_score_correction_bias[:2] += 0.05

    def load() -> torch.Tensor:
        with RoutingRecorder(model) as recorder, torch.no_grad():
            model(input_ids=ids)
            return expert_load(recorder.take(), experts)

    def violation(x: torch.Tensor) -> float:
        return float((x.max(-1).values / x.mean(-1)).max()) - 1.0

    start = violation(load())
    for _ in range(20):
        metrics = update_router_bias(model, load(), rate=0.01)
    assert start > 1.5 and violation(load()) < start / 3, (start, violation(load()))
    assert metrics["moe/router_bias_abs_max"].value > 0
    assert all(r.weight.grad is None for r in biased_routers(model))  # a buffer, not a learned weight


def test_rollout_routes_with_the_bias_the_trainer_publishes(tmp_path: Path) -> None:
    from tidal.config import load_config
    from tidal.model.routing import biased_routers
    from tidal.rollout.worker import RolloutWorker, WorkerConfig
    from tidal.trainer.actor import TrainerActor, TrainerActorConfig
    from tidal.types import Prompt

    path = materialize_preset("tiny-glm4-moe", seed=0)
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "trainer.micro_batch_size=8",
            "trainer.lr=1e-3",
            "algorithm.loss.router_bias_update_rate=0.01",
            f"output_dir={tmp_path}",
        ],
    ).for_rl()
    threads = torch.get_num_threads()
    worker = RolloutWorker(WorkerConfig.of(cfg), str(path))
    groups = worker.rollout([Prompt(i, {"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(2)], seed=0).groups
    for g in groups:
        for j, s in enumerate(g.samples):
            s.reward = float(j % 2)
    trainer = TrainerActor(TrainerActorConfig.of(cfg), str(path))
    result = trainer.step([g for g in groups])
    torch.set_num_threads(threads)
    module = trainer.trainer.module
    routers = biased_routers(module)
    biases = {
        f"{n}.e_score_correction_bias": r.e_score_correction_bias.clone()
        for n, r in module.named_modules()
        if any(r is x for x in routers)
    }
    assert biases and all(b.abs().max() == 0.01 for b in biases.values())  # one step of the rule moved each
    assert "moe/bias_update_load_violation" in values(result.metrics)
    state, version = trainer.snapshot()
    worker.load_weights((state, version))
    held = dict(worker.engine.model.named_buffers())
    assert all(torch.equal(held[name], bias) for name, bias in biases.items())


@pytest.mark.parametrize("mode", ["none", "r2"])
def test_r2_routes_every_minibatch_as_pi_old_routed(tmp_path: Path, mode: str) -> None:
    """With two minibatches the second is trained on weights the first moved: `r2` routes its tokens
    as the trainer's pi_old forward routed them; `none` (the control) lets them flip."""
    from tidal.config import load_config
    from tidal.model.routing import recorded_positions
    from tidal.rollout.worker import RolloutWorker, WorkerConfig
    from tidal.trainer.actor import TrainerActor, TrainerActorConfig
    from tidal.trainer.rl import build_batch
    from tidal.types import Prompt

    path = materialize_preset("tiny-glm4-moe", seed=0)
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            "rollout.group_size=4",
            "rollout.max_new_tokens=6",
            "trainer.micro_batch_size=4",
            "trainer.lr=0.05",
            "algorithm.minibatches=2",
            f"algorithm.routing_replay={mode}",
            f"output_dir={tmp_path}",
        ],
    ).for_rl()
    threads = torch.get_num_threads()
    rows = [Prompt(i, {"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(4)]
    groups = RolloutWorker(WorkerConfig.of(cfg), str(path)).rollout(rows, seed=0).groups
    for g in groups:
        for j, s in enumerate(g.samples):
            s.reward = float(j % 2)
    trainer = TrainerActor(TrainerActorConfig.of(cfg), str(path))
    with RoutingRecorder(trainer.trainer.module) as recorder:
        trainer.step(groups)
        routed = recorder.take().long()
    torch.set_num_threads(threads)
    batch, _ = build_batch(groups, "grpo", load_tokenizer(path).pad_token_id)
    rows_, length = batch.input_ids.shape
    assert routed.shape[0] == 2 * rows_ * length  # the pi_old forward, then the two minibatches' forwards
    pi_old, update = routed[: rows_ * length].view(rows_, length, -1), routed[rows_ * length :].view(rows_, length, -1)
    fed = recorded_positions(batch)
    same = (pi_old == update).all(-1)[fed]  # per token fed to the model: every layer's experts equal
    first = torch.arange(rows_)[:, None].expand(rows_, length)[fed] < rows_ // 2
    assert same[first].all()  # the first minibatch runs on pi_old's weights either way
    if mode == "r2":
        assert same.all()
    else:
        assert not same[~first].all()  # a step at lr 0.05 flips some of the second minibatch's routing


def test_r2_is_refused_without_a_pi_old_forward() -> None:
    from tidal.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="routing_replay=r2 replays the routing of the trainer's pi_old forward"):
        load_config(None, ["algorithm.routing_replay=r2", "algorithm.loss.correction.type=behavior"])


@pytest.mark.parametrize("preset", PRESETS)
def test_tokens_keep_the_routing_of_the_weights_that_made_them(preset: str) -> None:
    """Interruptible generation: new weights (here, the last MoE router redrawn) land mid-sample.
    Each position's record is the routing of the weights that computed it, the weights whose
    logits sampled the next token (its `versions` entry): the old routers' before the swap, the
    new ones' after it. R3 then replays exactly these records."""
    path: Path = materialize_preset(preset, seed=0)
    old, tok = load_model(path), load_tokenizer(path)
    new = load_model(path)
    name = next(n for n, m in new.named_modules() if m is moe_routers(new)[-1])
    with torch.no_grad():
        moe_routers(new)[-1].weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    swap = {f"{name}.weight": moe_routers(new)[-1].weight.detach().clone()}
    engine = TransformersEngine(load_model(path), tok)
    chunks = 0

    def on_chunk() -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 1:
            engine.load_weights(swap, version=1)

    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=1, ignore_eos=True)
    outs = engine.generate(
        [tok.encode(p) for p in PROMPTS], params, on_chunk=on_chunk, chunk_tokens=3, record_routing=True
    )
    mine: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    theirs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    old_after: list[torch.Tensor] = []  # the old routers' choice where the new ones routed
    for c in outs:
        assert c.versions == [0] * 3 + [1] * 7  # the swap came after the third token
        fed = torch.tensor([c.prompt_ids + c.token_ids[:-1]])
        plain = {0: plain_routing(old, fed), 1: plain_routing(new, fed)}
        # Position q's routing is the forward whose logits sampled token q - (P - 1): prompt
        # positions before the last one were prefilled by version 0.
        versions = [0] * (len(c.prompt_ids) - 1) + c.versions
        for q, v in enumerate(versions):
            mine[v].append(c.routing[q, -1].long().sort().values)
            theirs[v].append(plain[v][q, -1].sort().values)
            if v == 1:
                old_after.append(plain[0][q, -1].sort().values)
    for v in (0, 1):
        agree = (torch.stack(mine[v]) == torch.stack(theirs[v])).all(-1).float().mean()
        assert agree > 0.95, (v, agree)  # cached decoding and one forward may round a near tie apart
    flipped = (torch.stack(mine[1]) != torch.stack(old_after)).any(-1)
    assert flipped.float().mean() > 0.5  # the redrawn router routes the later tokens elsewhere


@pytest.mark.parametrize(
    ("preset", "skew"), [("tiny-qwen3-moe", "replay"), ("tiny-glm4-moe", "bias"), ("tiny-glm5-moe", "bias")]
)
def test_the_logged_expert_load_is_that_of_the_experts_the_model_routes_to(preset: str, skew: str) -> None:
    """`moe/expert_load_*`, logged by the RL loss, on a batch where the softmax top-k of the router
    logits is not where the tokens go: on GLM a correction bias that sends every token to experts 0
    and 1 (GLM routes by sigmoid scores plus that bias, in groups), on Qwen3-MoE routing replayed
    from a record that does the same (R3). The load logged is that of the experts a recorder sees
    the same forward route the batch's real tokens to; `moe/aux_loss` is the architecture's own
    balance loss over those choices (Switch on Qwen3-MoE, DeepSeek-V3's sequence-wise on GLM)."""
    from tidal.config import LossConfig
    from tidal.model.forward import forward
    from tidal.model.routing import expert_load
    from tidal.trainer.rl import RLLoss
    from tidal.types import TrainBatch

    model = load_model(materialize_preset(preset, seed=0))
    routers = moe_routers(model)
    layers, top_k, experts = len(routers), routers[0].top_k, routers[0].num_experts
    ids = torch.randint(6, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, 9:] = 0  # a padded row: its padding is no token of the batch
    ids[0, 9:] = model.config.pad_token_id
    zeros = torch.zeros(ids.shape)
    mask = torch.zeros_like(ids)
    mask[:, 5:] = attn[:, 5:]
    two = torch.arange(top_k)[None, None, None, :].expand(*ids.shape, layers, top_k)  # every token to 0..k-1
    batch = TrainBatch(
        ids,
        attn,
        mask,
        logp_mu=zeros,
        advantages=zeros + 1.0,
        versions=zeros.long(),
        routing=two.to(torch.uint8) if skew == "replay" else None,
    )
    if skew == "bias":
        for router in routers:
            router.e_score_correction_bias[:top_k] += 10.0
    loss = RLLoss(LossConfig(), temperature=1.0, max_len=12, replay=skew == "replay")
    with RoutingRecorder(model) as recorder, loss.around(model, batch):
        _, metrics = loss(model, batch)
        picked = recorder.take()  # (B*T, layers, top-k)
    real = attn.flatten().bool()
    n = int(real.sum())
    load = expert_load(picked[real], experts) * experts / (n * top_k)  # (layers, experts), 1.0 = uniform
    logged = values(metrics)
    assert logged["moe/expert_load_max"] == pytest.approx(float(load.max()))
    assert logged["moe/expert_load_min"] == pytest.approx(float(load.min()))
    assert float(load.max()) > 0.9 * experts / top_k and float(load.min()) == 0.0  # skewed onto two experts
    # The softmax top-k of the router logits (what these metrics used to count) routes otherwise.
    with torch.no_grad():
        _, router_logits = forward(model, ids, attn, router_logits=True)
        softmax = torch.stack([z.softmax(-1).topk(top_k).indices for z in router_logits], dim=1)
        assert not torch.equal(expert_load(softmax[real], experts), expert_load(picked[real], experts))
        from tidal.trainer.losses import sequence_aux_loss, switch_aux_loss

        balance = switch_aux_loss if preset == "tiny-qwen3-moe" else sequence_aux_loss
        own, _ = balance(router_logits, picked, attn.bool())
    if skew == "bias":  # without replay the forward above routes as the loss's did
        assert logged["moe/aux_loss"] == pytest.approx(float(own), rel=1e-5)
