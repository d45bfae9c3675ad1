"""Device-side sums of a population's update metrics between two log points."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..metrics import DIAGNOSTICS, PER_TASK_METRICS


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
