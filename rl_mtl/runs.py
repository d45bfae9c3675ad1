"""Finding, reading and grouping run directories (shared by evaluate, plot and sweep)."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import EXECUTION_KEYS, ConfigError, flatten, read_yaml_file
from .metrics import METRICS_NAME, read_metrics
from .run_dir import CONFIG_NAME


class RunsError(RuntimeError):
    """No usable runs, with what to check."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    unreadable_lines: int = 0

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]

    def tasks(self) -> list[str]:
        evals = self.evals
        return [k.split("/", 2)[2] for k in evals[0] if k.startswith("eval/success/")] if evals else []


@dataclass
class Group:
    """Runs of one method under one config (seeds differ)."""

    method: str
    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""  # the method (and its network unless shared); "... [config i]" when it has several configs


def find_run_dirs(patterns: list[str]) -> list[Path]:
    """Directories holding a run (a ``CONFIG_NAME``), from paths or globs, searched recursively."""
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern))] or [Path(pattern)]
        for path in matches:
            if not path.exists():
                raise RunsError(f"no such file or directory: {path}")
            if (path / CONFIG_NAME).is_file():
                found.append(path)
            elif path.is_dir():
                found.extend(sorted(p.parent for p in path.rglob(CONFIG_NAME)))
    unique = sorted(set(found))
    if not unique:
        raise RunsError(f"no run directories (with a config.yaml) under: {' '.join(patterns)}")
    return unique


def load_run(path: Path) -> Run:
    try:
        config = read_yaml_file(path / CONFIG_NAME, "the run's config")
    except ConfigError as err:
        raise RunsError(
            f"{err}; this run directory cannot be read: restore its {CONFIG_NAME}, or leave it out"
        ) from err
    records, bad = read_metrics(path / METRICS_NAME)
    return Run(path=path, config=config, records=records, unreadable_lines=bad)


def _relevant(config: dict[str, Any], with_method: bool) -> dict[str, Any]:
    """What decides a run's numbers besides its seed, flattened: everything but the seed and the
    execution keys (``config.EXECUTION_KEYS``), and of ``method_options`` and
    ``agent.architecture_options`` only the entry in use (the others are never read)."""
    out = {k: v for k, v in flatten(config).items() if k not in ("seed", "method", "method_options", *EXECUTION_KEYS)}
    agent = config.get("agent") or {}
    out["agent.architecture_options"] = (agent.get("architecture_options") or {}).get(agent.get("architecture"), {})
    if with_method:
        method = config.get("method")
        out["method"] = method
        out["method_options"] = (config.get("method_options") or {}).get(method, {})
    return out


def comparison_key(config: dict[str, Any]) -> str:
    """Runs with equal keys are seeds of one (method, config) group."""
    return json.dumps(_relevant(config, with_method=True), sort_keys=True)


def experiment_key(config: dict[str, Any]) -> str:
    """What the methods of one comparison share (the method and its options left out)."""
    return json.dumps(_relevant(config, with_method=False), sort_keys=True)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys where two runs' configs differ in what decides their numbers."""
    flat_a, flat_b = _relevant(a, True), _relevant(b, True)
    return sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))


def method_label(config: dict[str, Any]) -> str:
    """The method, with the network's architecture where it is not the default (shared)."""
    architecture = (config.get("agent") or {}).get("architecture", "shared")
    method = str(config.get("method"))
    return method if architecture == "shared" else f"{method} ({architecture})"


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Groups by (method, config); returns them and warnings about methods split across configs."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = comparison_key(run.config)
        groups.setdefault(key, Group(run.method, run.config, label=method_label(run.config))).runs.append(run)
    result = sorted(groups.values(), key=lambda g: (g.label, comparison_key(g.config)))
    warnings = []
    by_label: dict[str, list[Group]] = {}
    for g in result:
        by_label.setdefault(g.label, []).append(g)
    for label, gs in by_label.items():
        if len(gs) > 1:
            diffs = sorted({k for g in gs[1:] for k in config_differences(gs[0].config, g.config)})
            warnings.append(
                f"runs of '{label}' use {len(gs)} different configs (differing keys: "
                f"{', '.join(diffs)}); they are shown as separate groups, never pooled"
            )
            for i, g in enumerate(gs, 1):
                g.label = f"{label} [config {i}]"
    return result, warnings


def eval_matrix(run: Run, tasks: list[str], metric: str = "success") -> tuple[np.ndarray, np.ndarray]:
    """Eval steps [E] and per-task ``eval/<metric>/<task>`` values [E, tasks] of one run."""
    evals = run.evals
    steps = np.array([r["step"] for r in evals])
    values = np.array(
        [[np.nan if r.get(f"eval/{metric}/{t}") is None else r[f"eval/{metric}/{t}"] for t in tasks] for r in evals],
        dtype=np.float64,
    ).reshape(len(evals), len(tasks))
    return steps, values
