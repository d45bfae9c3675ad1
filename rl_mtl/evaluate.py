"""``python -m rl_mtl.evaluate``: success tables over seeds, or re-evaluation of a checkpoint.

python -m rl_mtl.evaluate runs/mt10                       # every run below, grouped
python -m rl_mtl.evaluate 'runs/mt10/*' --format markdown --out results.md
python -m rl_mtl.evaluate --checkpoint runs/mt10/nashmtl/seed0/checkpoint.pt --episodes 50
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError
from .envs import EnvError
from .run_dir import CheckpointError
from .runs import Group, Run, RunsError, eval_matrix, experiment_key, find_run_dirs, group_runs, load_run
from .stats import iqm, mean_sem, stratified_bootstrap_ci

FORMATS = ("table", "markdown", "csv", "latex", "json")
BOOTSTRAP_REPS = 2000
STATISTICS_NOTE = (
    "final = the last evaluation of each run; best = each run's evaluation with the highest mean success "
    "(the statistic of the published MT10 tables; optimistic). mean ± SEM over seeds, SEM = sample standard "
    "deviation (ddof=1) / sqrt(n seeds), n/a for a single seed. IQM = interquartile mean of the final "
    "success over all (seed, task) scores (per task: over seeds), with a 95% stratified bootstrap "
    f"confidence interval ({BOOTSTRAP_REPS} resamples of the seeds within each task, percentile method)."
)


@dataclass
class Summary:
    """The numbers of one group: per task and for the task mean."""

    label: str
    experiment: str  # the config shared by the methods being compared (method, seed... excluded)
    tasks: list[str]
    seeds: list[int]
    final: np.ndarray  # [seeds, tasks]
    best: np.ndarray  # [seeds, tasks]
    final_steps: list[int]
    episodes_per_task: float | None
    main_task: str | None = None  # the task a method optimises for (AuxiNash's main_task): reported first

    def task_row(self, j: int) -> dict[str, Any]:
        final_mean, final_sem = mean_sem(self.final[:, j])
        best_mean, best_sem = mean_sem(self.best[:, j])
        low, high = stratified_bootstrap_ci(self.final[:, j], reps=BOOTSTRAP_REPS)
        return {
            "task": self.tasks[j], "final_mean": final_mean, "final_sem": final_sem, "best_mean": best_mean,
            "best_sem": best_sem, "iqm": iqm(self.final[:, j]), "iqm_ci": [low, high], "seeds": len(self.seeds),
        }  # fmt: skip

    def mean_row(self) -> dict[str, Any]:
        final_mean, final_sem = mean_sem(self.final.mean(axis=1))
        best_mean, best_sem = mean_sem(self.best.mean(axis=1))
        low, high = stratified_bootstrap_ci(self.final, reps=BOOTSTRAP_REPS)
        worst = int(np.argmin(self.final.mean(axis=0)))
        return {
            "task": "mean over tasks", "final_mean": final_mean, "final_sem": final_sem, "best_mean": best_mean,
            "best_sem": best_sem, "iqm": iqm(self.final), "iqm_ci": [low, high], "seeds": len(self.seeds),
            "worst_task": self.tasks[worst], "worst_task_final_mean": float(self.final[:, worst].mean()),
        }  # fmt: skip


def summarize(group: Group, notes: list[str]) -> Summary | None:
    usable: list[Run] = []
    for run in group.runs:
        if run.unreadable_lines:
            notes.append(f"{run.path}: {run.unreadable_lines} unreadable line(s) in metrics.jsonl (a run killed "
                         "mid-write?); the readable records are used")  # fmt: skip
        if not run.evals:
            notes.append(f"{run.path}: no evaluation yet; skipped")
            continue
        usable.append(run)
    if not usable:
        return None
    tasks = usable[0].tasks()
    finals, bests, steps = [], [], []
    for run in usable:
        eval_steps, values = eval_matrix(run, tasks)
        finals.append(values[-1])
        bests.append(values[int(np.nanargmax(np.nanmean(values, axis=1)))])
        steps.append(int(eval_steps[-1]))
    if len(set(steps)) > 1:
        notes.append(f"{group.label}: runs end at different steps ({', '.join(map(str, steps))}): unfinished runs "
                     "are compared at a smaller budget")  # fmt: skip
    episodes = usable[0].evals[-1].get("eval/episodes_per_task")
    experiment = experiment_key(group.config)
    main_task = ((group.config.get("method_options") or {}).get(group.method) or {}).get("main_task")
    return Summary(group.label, experiment, tasks, [r.seed for r in usable], np.array(finals), np.array(bests), steps,
                   episodes, main_task if main_task in tasks else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _pm(mean: float, sem: float | None) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {'n/a' if sem is None else f'{sem:.3f}'}"


def _ci(row: dict[str, Any]) -> str:
    return f"{row['iqm']:.3f} [{row['iqm_ci'][0]:.3f}, {row['iqm_ci'][1]:.3f}]"


HEADER = ["task", "final (mean ± SEM)", "best (mean ± SEM)", "IQM final [95% CI]", "seeds"]
SUMMARY_HEADER = ["method", "final (mean ± SEM)", "best (mean ± SEM)", "IQM final [95% CI]", "worst task (final)",
                  "seeds"]  # fmt: skip


def _cells(row: dict[str, Any]) -> list[str]:
    return [row["task"], _pm(row["final_mean"], row["final_sem"]), _pm(row["best_mean"], row["best_sem"]),
            _ci(row), str(row["seeds"])]  # fmt: skip


def render(tables: list[tuple[str, list[str], list[list[str]]]], fmt: str, note: str) -> str:
    out = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(out)
        for title, header, rows in tables:
            writer.writerow(["table", *header])
            for row in rows:
                writer.writerow([title, *row])
        return out.getvalue()
    for title, header, rows in tables:
        if fmt == "markdown":
            out.write(f"### {title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
            out.writelines("| " + " | ".join(r) + " |\n" for r in rows)
        elif fmt == "latex":
            out.write(f"% {title}\n\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}\n\\toprule\n")
            out.write(" & ".join(_latex(h) for h in header) + " \\\\\n\\midrule\n")
            out.writelines(" & ".join(_latex(c) for c in r) + " \\\\\n" for r in rows)
            out.write("\\bottomrule\n\\end{tabular}\n")
        else:
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
            out.write(f"{title}\n")
            out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "\n")
            out.write("  ".join("-" * w for w in widths) + "\n")
            out.writelines("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + "\n" for r in rows)
        out.write("\n")
    prefix = {"markdown": "", "latex": "% ", "table": ""}[fmt]
    out.write(f"{prefix}{note}\n")
    return out.getvalue()


def _latex(text: str) -> str:
    return text.replace("±", "$\\pm$").replace("_", "\\_").replace("%", "\\%")


def build_report(summaries: list[Summary]) -> tuple[list[tuple[str, list[str], list[list[str]]]], dict[str, Any]]:
    tables, data = [], {"groups": [], "note": STATISTICS_NOTE}
    experiments: dict[str, list[list[str]]] = {}  # one summary table per experiment config
    for s in summaries:
        summary_rows = experiments.setdefault(s.experiment, [])
        rows = [s.task_row(j) for j in range(len(s.tasks))]
        main = None if s.main_task is None else rows.pop(s.tasks.index(s.main_task))
        if main is not None:  # what the method optimises for, first
            rows.insert(0, {**main, "task": f"{main['task']} (main task)"})
        mean = s.mean_row()
        episodes = "" if s.episodes_per_task is None else f", {s.episodes_per_task:g} evaluation episode(s) per task"
        title = f"{s.label}: {len(s.seeds)} seed(s) ({', '.join(map(str, s.seeds))}){episodes}"
        tables.append(
            (
                title,
                HEADER,
                [_cells(r) for r in [*rows, mean]]
                + [[f"worst task: {mean['worst_task']} ({mean['worst_task_final_mean']:.3f})", "", "", "", ""]],
            )
        )
        worst = f"{mean['worst_task']} ({mean['worst_task_final_mean']:.3f})"
        final, best = _pm(mean["final_mean"], mean["final_sem"]), _pm(mean["best_mean"], mean["best_sem"])
        label = (
            s.label
            if main is None
            else f"{s.label} (main task {s.main_task}: final {_pm(main['final_mean'], main['final_sem'])})"
        )
        summary_rows.append([label, final, best, _ci(mean), worst, str(len(s.seeds))])
        data["groups"].append({"label": s.label, "seeds": s.seeds, "final_steps": s.final_steps, "tasks": rows,
                               "mean": mean, "main_task": main})  # fmt: skip
    for i, rows in enumerate(experiments.values(), 1):
        which = f", experiment config {i} of {len(experiments)}" if len(experiments) > 1 else ""
        tables.append((f"Summary (rows = methods; success over tasks{which})", SUMMARY_HEADER, rows))
    return tables, data


# ---------------------------------------------------------------------------------------------
# Checkpoint re-evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_checkpoint(path: Path, episodes: int, device: str, seed: int | None) -> dict[str, Any]:
    """Re-run a checkpoint's deterministic policy: ``episodes`` episodes per task (one per stored
    goal) on an evaluation env seeded with the run's seed (or ``seed``)."""
    from .agents import SAC, Population
    from .checkpoint import load_checkpoint
    from .config import config_from_dict
    from .envs import make_vector_env, run_evaluations, task_names
    from .resume import refuse_unfitting
    from .runtime import resolve_device

    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    dev = resolve_device(device)
    eval_seed = cfg.seed if seed is None else seed
    env = make_vector_env(cfg.env, eval_seed, evaluation=True)
    try:
        tasks = task_names(cfg.env)
        obs_dim, action_dim = env.single_observation_space.shape[0], env.single_action_space.shape[0]
        sac = SAC(obs_dim, action_dim, tasks, cfg.agent, cfg.method, cfg.method_options.get(cfg.method, {}))
        population = Population(sac, [cfg.seed], dev)
        with refuse_unfitting(path, state):
            population.load_seed_state(0, {"agent": state["agent"], "generator": state["agent_generator"]})
        success, returns = run_evaluations([env], population.policy, episodes, cfg.env.max_episode_steps)
    finally:
        env.close()
    return {"checkpoint": str(path), "step": state["step"], "episodes": episodes, "seed": eval_seed,
            "success": dict(zip(tasks, success[0].tolist(), strict=True)), "success_mean": float(success.mean()),
            "return": dict(zip(tasks, returns[0].tolist(), strict=True))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="*", help="run directories, parents of run directories, or globs")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--out", type=Path, help="write the report to this file instead of the console")
    parser.add_argument("--checkpoint", type=Path, help="re-evaluate this checkpoint instead of reading runs")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per task for --checkpoint (default 50)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, help="evaluation env seed for --checkpoint (default: the run's)")
    args = parser.parse_args(argv)
    try:
        if args.checkpoint is not None:
            if args.episodes < 1:
                parser.error("--episodes must be >= 1")
            result = evaluate_checkpoint(args.checkpoint, args.episodes, args.device, args.seed)
            if args.format == "json":
                text = json.dumps(result, indent=2) + "\n"
            else:
                rows = [[t, f"{v:.3f}"] for t, v in result["success"].items()]
                rows.append(["mean over tasks", f"{result['success_mean']:.3f}"])
                title = (
                    f"{result['checkpoint']} (step {result['step']}): success over {args.episodes} episode(s) per task"
                )
                text = render([(title, ["task", "success"], rows)], args.format,
                              "deterministic policy; success = the success flag at any step of an episode")  # fmt: skip
        else:
            if not args.runs:
                parser.error("give run directories (or globs), or --checkpoint PATH")
            notes: list[str] = []
            groups, warnings = group_runs([load_run(p) for p in find_run_dirs(args.runs)])
            notes += warnings
            summaries = [s for g in groups if (s := summarize(g, notes)) is not None]
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            if not summaries:
                raise RunsError("none of the runs has an evaluation yet; evaluations are logged every "
                                "train.eval_every steps and at the end of a run")  # fmt: skip
            tables, data = build_report(summaries)
            text = (
                json.dumps(data, indent=2) + "\n"
                if args.format == "json"
                else render(tables, args.format, STATISTICS_NOTE)
            )
    except (RunsError, CheckpointError, ConfigError, EnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
