"""Run logging: a plain JSONL metrics file (the source of truth for rl_mtl.evaluate and plots),
TensorBoard event files with the same scalars, and a console progress bar."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


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
    so a resumed run's file matches an uninterrupted one. Rewritten atomically."""
    records, _ = read_metrics(path)
    kept = [r for r in records if r["step"] <= last_step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


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
