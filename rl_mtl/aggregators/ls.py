"""Linear scalarisation ("MTL SAC"): the mean of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator


class LinearScalarization(Aggregator):
    """w_i = 1/K. Never falls back (non-finite input is still counted by the base class)."""

    name = "ls"

    def needs_gramian(self) -> bool:
        return False

    def __call__(self, gramian: Tensor | None, losses: Tensor | None = None) -> Tensor:
        if gramian is None:
            if losses is None:
                raise ValueError("ls: pass the Gramian or the [K] losses so that K is known")
            k = losses.shape[0]
            return torch.full((k,), 1.0 / k, dtype=losses.dtype, device=losses.device)
        return super().__call__(gramian, losses)

    def _weights(self, gramian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device), self.no_fallback(gramian)
