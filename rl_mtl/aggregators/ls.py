"""Linear scalarisation ("MTL SAC"): the mean of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator


class LinearScalarization(Aggregator):
    """w_i = 1/K. Never falls back (non-finite input is still counted when a Gramian is given;
    the trainer gives none, ``uses_gramian`` being False)."""

    name = "ls"
    uses_gramian = False

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device), self.no_fallback(gramian)
