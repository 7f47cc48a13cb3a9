"""The rollout processes: the worker actor (`worker`: generation, scoring, weight offers), its work
queue, the trajectory buffer actor (`buffer`), envs at run time (`env_runtime`, `episodes`), held-out
evaluation, and the generation engines (`engines`)."""
