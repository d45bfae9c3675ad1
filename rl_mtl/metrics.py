"""Training metrics: device-side sums between log points, the logged scalars' names, and the run
log (``metrics.jsonl``, the source of truth for rl_mtl.evaluate and plots, and TensorBoard
events with the same scalars)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .run_dir import write_text_atomic

METRICS_NAME = "metrics.jsonl"
# update metric -> the logged scalar's prefix (one scalar per task: "<prefix>/<task>")
PER_TASK_METRICS = {
    "critic_loss": "loss/critic",
    "actor_loss": "loss/actor",
    "temperature": "temperature",
    "entropy": "entropy",
    "critic_weights": "weights/critic",
    "actor_weights": "weights/actor",
}


DIAGNOSTICS = ("critic_min_cosine", "actor_min_cosine")  # last value only (nan: skipped, or not measured)


class MetricSums:
    """Sums of a population's update metrics since the last log, in buffers allocated once on the
    device ([S, K] per summed metric, [S] counts): an update adds to them in place (``add_``, inside
    a compiled or graph-replayed update too), and the trainer reads them once per log. A seed's
    skipped update (``applied`` False) adds nothing, so its interval means cover its applied
    updates only; the diagnostics keep their last value."""

    def __init__(self, num_seeds: int, num_tasks: int, device: torch.device) -> None:
        self.sums = {name: torch.zeros(num_seeds, num_tasks, device=device) for name in PER_TASK_METRICS}
        self.updates = torch.zeros(num_seeds, dtype=torch.int64, device=device)  # applied updates
        self.latest = {name: torch.full((num_seeds,), torch.nan, device=device) for name in DIAGNOSTICS}

    def tensors(self) -> list[Tensor]:
        """Every buffer (a replayed CUDA graph needs them at fixed addresses)."""
        return [*self.sums.values(), self.updates, *self.latest.values()]

    def add_(self, metrics: dict[str, Tensor]) -> None:
        applied = metrics["applied"]
        for name, total in self.sums.items():  # where, not *: a skipped update's value may be nan
            total.add_(torch.where(applied[:, None], metrics[name], 0.0))
        for name, last in self.latest.items():
            if name in metrics:
                last.copy_(torch.where(applied, metrics[name], torch.nan))
        self.updates.add_(applied.to(torch.int64))

    def means(self) -> list[dict[str, np.ndarray]]:
        """Per seed: each metric's mean over its applied updates, and the diagnostics' last values
        (empty for a seed without an applied update); reading synchronises."""
        counts = self.updates.cpu().numpy()
        sums = {k: v.cpu().numpy() for k, v in self.sums.items()}
        latest = {k: v.cpu().numpy() for k, v in self.latest.items()}
        return [
            {**{k: v[s] / n for k, v in sums.items()}, **{k: v[s] for k, v in latest.items()}} if n else {}
            for s, n in enumerate(counts)
        ]

    def reset(self) -> None:
        for total in self.sums.values():
            total.zero_()
        self.updates.zero_()
        for last in self.latest.values():
            last.fill_(torch.nan)

    def seed_state(self, s: int) -> dict[str, Any]:
        """Seed ``s``'s sums since the last log (a checkpoint between two log points keeps them)."""
        return {
            "sums": {k: v[s].cpu() for k, v in self.sums.items()},
            "updates": int(self.updates[s]),
            "latest": {k: v[s].cpu() for k, v in self.latest.items()},
        }

    def load_seed_state(self, s: int, state: dict[str, Any]) -> None:
        for name, total in self.sums.items():
            total[s].copy_(state["sums"][name])
        self.updates[s] = int(state["updates"])
        for name, last in self.latest.items():
            last[s].copy_(state["latest"][name])


def per_task(prefix: str, values: np.ndarray, tasks: list[str]) -> dict[str, float]:
    return {f"{prefix}/{task}": float(v) for task, v in zip(tasks, values, strict=True)}


def training_scalars(means: dict[str, np.ndarray], tasks: list[str]) -> dict[str, float]:
    """The logged scalars of one seed's update metrics (its ``MetricSums.means`` entry)."""
    if not means:
        return {}
    scalars: dict[str, float] = {}
    for key, prefix in PER_TASK_METRICS.items():
        scalars.update(per_task(prefix, means[key], tasks))
    scalars["loss/critic_mean"] = float(means["critic_loss"].mean())
    scalars["loss/actor_mean"] = float(means["actor_loss"].mean())
    for name in ("critic", "actor"):
        cosine = means.get(f"{name}_min_cosine")
        if cosine is not None and np.isfinite(cosine):  # nan: the diagnostic update was skipped, or K = 1
            scalars[f"grad/min_cosine_{name}"] = float(cosine)
    return scalars


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All complete records of a metrics file, and how many lines were unreadable (a run killed
    mid-write leaves at most a truncated last line)."""
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            else:
                bad += 1
    return records, bad


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (written after the checkpoint a resume starts from),
    so a resumed run's file matches an uninterrupted one."""
    records, _ = read_metrics(path)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= last_step))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard under ``run_dir``.

    ``purge_step``: on resume, TensorBoard hides events at or after this step that the killed
    run wrote past its last checkpoint.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = run_dir / METRICS_NAME
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float], kind: str) -> None:
        """One record: ``kind`` is "train", "episode" or "eval" (rl_mtl.evaluate reads "eval")."""
        record = {"step": step, "kind": kind, **{k: _clean(float(v)) for k, v in scalars.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for tag, value in scalars.items():
                if math.isfinite(float(value)):
                    self.writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        self.file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
