"""What a run reports: metrics that declare how they merge (`metrics`), the row format of
metrics.jsonl (`rows`), the sinks (terminal, jsonl, wandb: `monitor`) and `tidal plot` (`plots`)."""
