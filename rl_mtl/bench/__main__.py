"""``python -m rl_mtl.bench {aggregators,train}``."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from . import aggregators, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    aggregators.add_arguments(
        sub.add_parser("aggregators", help="aggregator solve times, Nash native vs cvxpy, per-task gradient cost")
    )
    train.add_arguments(sub.add_parser("train", help="update time, kernels and training throughput per method"))
    args = parser.parse_args(argv)
    try:
        result = aggregators.run(args) if args.command == "aggregators" else train.run(args)
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
