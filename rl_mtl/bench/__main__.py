"""``python -m rl_mtl.bench {aggregators,train,goals}``."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from . import aggregators, goals, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    aggregators.add_arguments(
        sub.add_parser("aggregators", help="aggregator solve times, Nash native vs cvxpy, per-task gradient cost")
    )
    train.add_arguments(sub.add_parser("train", help="update time, kernels and training throughput per method"))
    goals.add_arguments(sub.add_parser("goals", help="the speed goals' verdicts from bench train results"))
    args = parser.parse_args(argv)
    commands = {"aggregators": aggregators.run, "train": train.run, "goals": goals.run}
    try:
        result = commands[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
