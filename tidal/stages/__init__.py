"""What a user runs: `tidal train` (`train`), `tidal sft` (`sft`), `tidal eval` (`eval`), `tidal
check` (`check`), `tidal plan` (`plan`), and the SFT warm start a train run starts from
(`warm_start`)."""
