"""The driver process: the RL loop (`loop`), which prompts go to which worker when and the restart of
a worker that failed (`dispatch`), and the adaptive staleness bound (`staleness`)."""
