"""`tidal check | sft CONFIG [key=value ...]`: parse the config, then import the heavy modules."""

from __future__ import annotations

import argparse
import logging
import sys

from tidal.config import ConfigError, dump_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal", description="Asynchronous RL post-training for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("check", "validate a run config and print it resolved"),
        ("sft", "supervised fine-tuning"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            print(dump_config(cfg), end="")
            return 0
        from tidal.sft import run_sft

        run_sft(cfg)
    except ConfigError as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
