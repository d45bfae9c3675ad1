"""``python -m rl_mtl.bench goals RESULT.json...``: the speed goals, one verdict line each, from
``bench train`` results (what ``scripts/gpu_check.sh`` prints at its end).

The goals (README: Speed), judged on the fastest mode measured for Nash-MTL:
- a Nash-MTL update costs at most 1.3x a mean-loss (``ls``) update of the same mode and seeds;
- training runs at >= 70% of the env-only throughput (the update hidden behind the envs' step);
- 10 seeds x 2M MT10 steps take < 12 h of wall-clock (aim: 6 h).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError

UPDATE_OVER_LS, TRAIN_OVER_ENV, HOURS_GOAL, HOURS_AIM = 1.3, 0.7, 12.0, 6.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="bench train --json files")
    parser.add_argument("--json", type=Path, help="also write the verdicts to this JSON file")


def _label(row: dict[str, Any]) -> str:
    return f"S={row['seeds']}, compile={row['compile']}, {row['device']}"


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    """One line per goal: PASS, FAIL, or NOT MEASURED (no Nash-MTL, or no ls to compare with)."""
    rows = [{**row, "seeds": r["seeds"], "device": r["device"]} for r in results for row in r["methods"]]
    nash = [row for row in rows if row["method"] == "nashmtl"]
    if not nash:
        return [f"NOT MEASURED  {goal}: no nashmtl rows" for goal in ("update", "throughput", "wall-clock")]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines = []
    compared = [row for row in nash if row["update_over_ls"] is not None]
    if compared:
        best = min(compared, key=lambda row: row["update_ms"])
        ratio = best["update_over_ls"]
        lines.append(f"{verdict(ratio <= UPDATE_OVER_LS)}  Nash-MTL update <= {UPDATE_OVER_LS}x ls update: "
                     f"{ratio:.2f}x ({best['update_ms']:.2f} ms; {_label(best)})")  # fmt: skip
    else:
        lines.append(f"NOT MEASURED  Nash-MTL update <= {UPDATE_OVER_LS}x ls update: no ls run of the same mode")
    best = max(nash, key=lambda row: row["train_over_env_only"])
    share = best["train_over_env_only"]
    lines.append(f"{verdict(share >= TRAIN_OVER_ENV)}  Nash-MTL training >= {TRAIN_OVER_ENV:.0%} of env-only "
                 f"throughput: {share:.0%} ({best['train_steps_per_s']:.1f} steps/s; {_label(best)})")  # fmt: skip
    best = min(nash, key=lambda row: row["protocol_hours_10_seeds"])
    hours = best["protocol_hours_10_seeds"]
    aim = "within the aim" if hours <= HOURS_AIM else f"above the {HOURS_AIM:.0f} h aim"
    lines.append(f"{verdict(hours < HOURS_GOAL)}  10 seeds x 2M MT10 steps < {HOURS_GOAL:.0f} h: {hours:.1f} h, "
                 f"{aim} (Nash-MTL; {_label(best)}; evaluations excluded)")  # fmt: skip
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable bench train result ({err})") from err
        if not isinstance(result, dict) or not isinstance(result.get("methods"), list):
            raise ConfigError(f"{path}: not a bench train result (no 'methods' list); make it with "
                             "python -m rl_mtl.bench train --json FILE")  # fmt: skip
        results.append(result)
    lines = verdicts(results)
    print("\n".join(lines))
    return {"verdicts": lines}
