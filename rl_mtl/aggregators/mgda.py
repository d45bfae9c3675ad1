"""MGDA (Desideri 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, normalize_gramian
from .solvers import barrier_minimize


def min_norm_weights(a: Tensor) -> Tensor:
    """argmin over the simplex of 0.5 w^T A w, solved to optimality (barrier Newton)."""
    k = a.shape[0]

    def value(w: Tensor) -> Tensor:
        return 0.5 * ((w @ a) * w).sum(-1)

    def grad_hess(w: Tensor) -> tuple[Tensor, Tensor]:
        return a @ w, a

    return barrier_minimize(value, grad_hess, torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device))


class MGDA(Aggregator):
    """Weights on the simplex (they sum to 1, like the mean) whose combination is the
    minimum-norm element of the convex hull of the task gradients. Scale invariant. When the
    hull contains 0 the direction is 0 and the weights are one of the (non-unique) minimisers.
    Never falls back.
    """

    name = "mgda"

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        a, _, _ = normalize_gramian(gramian)
        return min_norm_weights(a), self.no_fallback(gramian)
