"""PCGrad (Yu et al., NeurIPS 2020): project away conflicting components, then average."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, normalize_gramian


def pcgrad_weights(a: Tensor, order: Tensor) -> Tensor:
    """PCGrad as weights on the original gradients, from the Gramian alone.

    ``order[i]`` is the (random) order in which task i visits the tasks; itself is skipped
    (Algorithm 1 of the paper projects onto the *other* tasks). Row i of ``coef`` holds
    g_i^PC = sum_k coef[i, k] g_k; projecting onto g_j only changes coef[i, j]. All tasks take
    their s-th projection together, so the loop has K steps of [K, K] tensor work.
    Returns the mean of the projected gradients' coefficients ("mean" reduction).
    """
    k = a.shape[0]
    rows = torch.arange(k, device=a.device)
    coef = torch.eye(k, dtype=a.dtype, device=a.device)
    sq_norms = torch.diagonal(a)
    tiny = torch.finfo(a.dtype).tiny
    for s in range(k):
        j = order[:, s]
        dots = (coef @ a)[rows, j]  # g_i^PC . g_j
        conflict = (dots < 0) & (j != rows) & (sq_norms[j] > tiny)
        shift = torch.where(conflict, dots / torch.where(conflict, sq_norms[j], 1.0), 0.0)
        coef = coef.index_put((rows, j), -shift, accumulate=True)
    return coef.mean(dim=0)


class PCGrad(Aggregator):
    """PCGrad with mean reduction. Each call's K task orders (row i: the order in which task i
    visits the others) are the argsort of the rows of ``uniform``, the caller's seeded random
    numbers, so the orders are as reproducible and checkpointed as the caller's generator. A task
    with a zero gradient is never projected onto (no fallback needed).
    """

    name = "pcgrad"

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        a, _, _ = normalize_gramian(gramian)  # the weights are scale invariant
        return pcgrad_weights(a, torch.argsort(uniform, dim=1)), self.no_fallback(gramian)
