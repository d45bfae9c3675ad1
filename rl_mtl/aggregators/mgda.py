"""MGDA (Desideri 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, normalize_gramian
from .solvers import active_set, active_set_budget, face_solve, with_ridge


def min_norm_weights(a: Tensor) -> tuple[Tensor, Tensor]:
    """argmin over the simplex of 0.5 w^T A w, solved exactly (``active_set``); returns (weights,
    converged). On a face F the minimiser is A_FF^-1 1 / (1^T A_FF^-1 1): the min-norm point of
    the affine hull of the face's task gradients."""
    k = a.shape[0]
    a_reg = with_ridge(a)
    ones = torch.ones(k, 1, dtype=a.dtype, device=a.device)

    def face(free: Tensor) -> Tensor:
        y = face_solve(a_reg, free, ones)[:, 0]
        return y / y.sum()

    start = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
    free = torch.ones(k, dtype=torch.bool, device=a.device)
    return active_set(face, lambda w: a_reg @ w, start, free, simplex=True, max_iter=active_set_budget(k))


class MGDA(Aggregator):
    """Weights on the simplex (they sum to 1, like the mean) whose combination is the
    minimum-norm element of the convex hull of the task gradients. Scale invariant. When the
    hull contains 0 the direction is 0 and the weights are one of the (non-unique) minimisers.
    Fallback (counted): the solve did not converge within its 2K+2 iterations (the weights are
    then a feasible point short of the optimum).
    """

    name = "mgda"

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        a, _, _ = normalize_gramian(gramian)
        weights, converged = min_norm_weights(a)
        return weights, ~converged
