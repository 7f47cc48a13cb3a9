"""tidal: asynchronous RL post-training of mixture-of-experts language models.

Each package is one process or one wire, and imports only the ones below it
(tests/unit/test_layout.py keeps it so; docs/architecture.md draws it):

- `stages`: what a user runs (`tidal train`, `sft`, `eval`, `check`, the SFT warm start); `cli`.
- `driver`: the driver process: the loop, dispatch, worker restarts, the staleness bound.
- `rollout`: the rollout worker actor, its queue, the trajectory buffer actor, envs at run time,
  evaluation, and the generation engines (`rollout.engines`).
- `trainer`: the trainer actors (DeepSpeed ranks), losses, advantages, off-policy corrections.
- `weight_sync`: the wire from the trainer to the workers, a module per transport.
- `envs`, `rewards`: the user's code's interfaces and the built-ins; `plugins`: loading user code
  and calling it bounded and isolated.
- `model`: presets and loading, forward passes and log-probs, MoE routing, load-time patches.
- `checkpoint` (the format the driver and the trainer write), `runtime` (Ray, logs and stacks
  every process shares), `data` (datasets, prompts, answers).
- `telemetry`: metrics that know how they merge, the row format, sinks, plots.
- `config`, `types`: the typed config and the data every process passes.
"""
