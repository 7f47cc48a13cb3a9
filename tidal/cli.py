"""`tidal check [--stage sft] | sft | train | eval | plan CONFIG [key=value ...]`, `tidal plot RUN_DIR ...`: parse the
arguments, then import the heavy modules."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tidal.config import ConfigError, dump_config, load_config
from tidal.runtime import terminal_log


def parser() -> argparse.ArgumentParser:
    """tidal's command line (the docs' test parses their commands with it)."""
    parser = argparse.ArgumentParser(prog="tidal", description="Asynchronous RL post-training for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("check", "run the start-up checks of `tidal train` (or --stage sft) and print the config as it would run"),
        ("sft", "supervised fine-tuning"),
        ("train", "RL training (rollout workers, buffer and DeepSpeed trainer on Ray)"),
        ("eval", "score a checkpoint (checkpoint=PATH; default the config's policy) on the held-out data"),
        ("plan", "print the memory each process of `tidal train` will need (trainer ranks, engines, host)"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-5")
        if name == "check":
            p.add_argument(
                "--stage",
                choices=["train", "sft"],
                default="train",
                help="the command whose checks to run (default: train)",
            )
    plot = sub.add_parser("plot", help="draw runs' curves, staleness and time split as PNGs in their directories")
    plot.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Read when transformers is imported: its weight-loading bars would cut through the progress display.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, handlers=[terminal_log()])
    if args.command == "plot":
        return _plot(args.runs)
    try:
        _run(args)
    except ConfigError as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from tidal.runtime import RunError

        if not isinstance(e, RunError):
            raise
        print(f"tidal: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    """`tidal check | sft | eval | train`; the heavy modules are imported only here."""
    # `checkpoint=PATH` names what `tidal eval` scores; it is not a config key.
    checkpoints = [o.partition("=")[2] for o in args.overrides if o.startswith("checkpoint=")]
    if checkpoints and args.command != "eval":
        raise ConfigError("checkpoint=PATH is an argument of `tidal eval` only")
    cfg = load_config(args.config, [o for o in args.overrides if not o.startswith("checkpoint=")])
    if args.command == "check":
        from tidal.stages.check import check_sft, check_train

        print(dump_config((check_sft if args.stage == "sft" else check_train)(cfg).cfg), end="")
    elif args.command == "plan":
        from tidal.stages.check import check_train
        from tidal.stages.plan import check_fits, describe, no_gpu

        start = check_train(cfg, fit=False)  # the plan `tidal train` makes: rows as long as the data's longest
        print("\n".join(describe(start.plan, start.cfg)))
        check_fits(start.plan, start.cfg)  # a plan that does not fit is printed, then refused as train would
        print("fits the memory this node has" + (" (GPU memory not checked: no GPU here)" if no_gpu() else ""))
    elif args.command == "sft":
        from tidal.stages.sft import run_sft

        run_sft(cfg)
    elif args.command == "eval":
        from tidal.stages.eval import run_eval

        run_eval(cfg, checkpoints[-1] if checkpoints else None)
    else:
        from tidal.stages.train import run_train

        run_train(cfg)


def _plot(runs: list[str]) -> int:
    from tidal.telemetry.plots import plot_runs

    try:
        for path in plot_runs([Path(r) for r in runs]):
            print(path)
    except ConfigError as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
