"""``python -m rl_mtl.plot RUN_DIR ...``: learning curves as PNG files.

Writes two figures: the evaluation success and return (means over tasks) against training steps
(one line per method, mean over seeds with an SEM band), and a grid of success with one panel
per task. Runs are grouped
as in ``rl_mtl.evaluate`` (method x config, never pooled across configs).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from .runs import Group, RunsError, eval_matrix, find_run_dirs, group_runs, load_run


def curves(group: Group, metric: str = "success") -> tuple[np.ndarray, np.ndarray, list[str], int] | None:
    """Eval steps shared by all seeds [E], values [seeds, E, tasks], task names, seeds."""
    runs = [r for r in group.runs if r.evals]
    if not runs:
        return None
    tasks = runs[0].tasks()
    matrices = [eval_matrix(r, tasks, metric) for r in runs]
    common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in matrices)))
    if not common:
        return None
    stacked = np.stack([values[np.searchsorted(steps, common)] for steps, values in matrices])
    return np.array(common), stacked, tasks, len(runs)


def _band(ax, steps: np.ndarray, values: np.ndarray, label: str) -> None:
    """Mean over seeds (axis 0) with a +- SEM band (no band for one seed)."""
    mean = np.nanmean(values, axis=0)
    line = ax.plot(steps, mean, label=label, linewidth=1.6)[0]
    if values.shape[0] > 1:
        sem = np.nanstd(values, axis=0, ddof=1) / math.sqrt(values.shape[0])
        ax.fill_between(steps, mean - sem, mean + sem, color=line.get_color(), alpha=0.25, linewidth=0)


def plot(patterns: list[str], out_dir: Path, prefix: str = "mt") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, warnings = group_runs([load_run(p) for p in find_run_dirs(patterns)])
    for w in warnings:
        print(f"note: {w}", file=sys.stderr)
    data = [(g, c) for g in groups if (c := curves(g)) is not None]
    if not data:
        raise RunsError("none of the runs has an evaluation yet: nothing to plot")
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, (ax, ax_return) = plt.subplots(1, 2, figsize=(12, 4.5))
    for group, (steps, values, _, n) in data:
        _band(ax, steps, values.mean(axis=2), f"{group.label} ({n} seed{'s' if n > 1 else ''})")
        returns = curves(group, "return")
        if returns is not None and np.isfinite(returns[1]).any():
            _band(ax_return, returns[0], returns[1].mean(axis=2), group.label)
    ax.set(xlabel="vector steps", ylabel="evaluation success (mean over tasks)", ylim=(-0.02, 1.02))
    ax.set_title("Evaluation success: mean over seeds ± SEM")
    ax_return.set(xlabel="vector steps", ylabel="evaluation return (mean over tasks)")
    ax_return.set_title("Evaluation return: mean over seeds ± SEM")
    for a in (ax, ax_return):
        a.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    mean_path = out_dir / f"{prefix}_success.png"
    fig.savefig(mean_path, dpi=120)
    plt.close(fig)

    tasks = data[0][1][2]
    cols = min(5, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True, sharey=True)
    for j, task in enumerate(tasks):
        ax = axes[j // cols][j % cols]
        for group, (steps, values, group_tasks, _) in data:
            if task in group_tasks:
                _band(ax, steps, values[:, :, group_tasks.index(task)], group.label)
        ax.set_title(task, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for j in range(len(tasks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.supxlabel("vector steps")
    fig.supylabel("evaluation success")
    fig.tight_layout()
    grid_path = out_dir / f"{prefix}_success_per_task.png"
    fig.savefig(grid_path, dpi=110)
    plt.close(fig)
    return [mean_path, grid_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", help="run directories, parents of run directories, or globs")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="output directory (default: plots)")
    parser.add_argument("--prefix", default="mt", help="file name prefix (default: mt)")
    args = parser.parse_args(argv)
    try:
        paths = plot(args.runs, args.out, args.prefix)
    except RunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
