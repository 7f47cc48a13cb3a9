"""The trainer processes: N DeepSpeed ranks as Ray actors (`actor`, `group`), the DeepSpeed engine
(`engine`), the RL step (`rl`), losses, advantages and off-policy corrections."""
