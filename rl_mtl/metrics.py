"""What a run logs: the scalars of its three kinds of record (train, episode, eval) and the run
log (``metrics.jsonl``, the source of truth for rl_mtl.evaluate and plots, and TensorBoard
events with the same scalars). No torch: readers of results import this; the device-side sums
the scalars come from are ``agents.sums``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

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


def per_task(prefix: str, values: np.ndarray, tasks: list[str]) -> dict[str, float]:
    return {f"{prefix}/{task}": float(v) for task, v in zip(tasks, values, strict=True)}


def training_scalars(means: dict[str, np.ndarray], tasks: list[str], *, rate: float, buffer_size: int,
                     fallbacks: dict[str, int], nonfinite_updates: int,
                     method_state: dict[str, np.ndarray]) -> dict[str, float]:  # fmt: skip
    """One seed's "train" record: the throughput, the replay's size, its update metrics' interval
    means (its ``MetricSums.means`` entry: empty without an applied update), its aggregators'
    fallback counts (per network), its skipped updates, and the method's logged state (scalar
    prefix -> [K])."""
    scalars = {"perf/steps_per_second": rate, "buffer/size": float(buffer_size)}
    if means:
        for key, prefix in PER_TASK_METRICS.items():
            scalars.update(per_task(prefix, means[key], tasks))
        scalars["loss/critic_mean"] = float(means["critic_loss"].mean())
        scalars["loss/actor_mean"] = float(means["actor_loss"].mean())
        for name in ("critic", "actor"):
            cosine = means.get(f"{name}_min_cosine")
            if cosine is not None and np.isfinite(cosine):  # nan: the diagnostic update was skipped, or K = 1
                scalars[f"grad/min_cosine_{name}"] = float(cosine)
    for network, count in fallbacks.items():
        scalars[f"aggregator/fallbacks_{network}"] = float(count)
    scalars["train/nonfinite_updates"] = float(nonfinite_updates)
    for prefix, values in method_state.items():
        scalars.update(per_task(prefix, values, tasks))
    return scalars


def episode_scalars(returns: np.ndarray, success: np.ndarray, names: list[str], num_tasks: int) -> dict[str, float]:
    """One seed's "episode" record: the return and success of the episodes that just ended (of the
    tasks ``names``), and their means when every task's ended."""
    scalars = per_task("episode/return", returns, names)
    scalars.update(per_task("episode/success", success, names))
    if len(names) == num_tasks:
        scalars["episode/return_mean"] = float(returns.mean())
        scalars["episode/success_mean"] = float(success.mean())
    return scalars


def eval_scalars(success: np.ndarray, returns: np.ndarray, tasks: list[str], episodes: int) -> dict[str, float]:
    """One seed's "eval" record (what rl_mtl.evaluate reads): success and return per task and
    their means, over ``episodes`` episodes per task."""
    scalars = per_task("eval/success", success, tasks)
    scalars.update(per_task("eval/return", returns, tasks))
    scalars["eval/success_mean"] = float(success.mean())
    scalars["eval/return_mean"] = float(returns.mean())
    scalars["eval/episodes_per_task"] = float(episodes)
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
