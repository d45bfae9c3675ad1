"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, AggregatorError, normalize_gramian
from .solvers import simplex_minimize

RESCALES = (0, 1, 2)


def cagrad_dual_weights(a: Tensor, c: float) -> Tensor:
    """The dual solution w* = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|, solved to optimality."""
    k = a.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
    a_mean = a @ mean  # [K]: g_i . g_0
    radius = c * torch.sqrt(torch.clamp(mean @ a_mean, min=0.0))  # c |g_0|
    smooth = 1e-30  # keeps sqrt differentiable if g_w = 0 is reachable

    def value(w: Tensor) -> Tensor:
        return w @ a_mean + radius * torch.sqrt(((w @ a) * w).sum(-1) + smooth)

    def grad_hess(w: Tensor) -> tuple[Tensor, Tensor]:
        aw = a @ w
        norm = torch.sqrt(w @ aw + smooth)
        grad = a_mean + radius * aw / norm
        hess = radius * (a / norm - torch.outer(aw, aw) / norm**3)
        return grad, hess

    return simplex_minimize(value, grad_hess, k, like=a)


class CAGrad(Aggregator):
    """d = g_0 + (c |g_0| / |g_w*|) g_w*, returned as weights on the task gradients.

    Options: c >= 0 (default 0.4; the MT10 configs use 0.9); rescale 0 (none), 1 (divide by
    1 + c^2, the reference code's default) or 2 (divide by 1 + c). The dual over the simplex
    is solved to optimality with a barrier Newton method, not with a fixed number of SGD steps.
    Fallback (counted): if g_w* = 0 (the mean lies in a fully conflicting cone) the direction
    is just g_0, rescaled.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        if not isinstance(c, (int, float)) or not c >= 0:
            raise AggregatorError(f"cagrad: c must be a number >= 0, got {c!r}")
        if rescale not in RESCALES:
            raise AggregatorError(f"cagrad: rescale must be one of {RESCALES} (none, 1+c^2, 1+c), got {rescale!r}")
        self.c = float(c)
        self.rescale = rescale

    def options(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        k = gramian.shape[0]
        a, _, _ = normalize_gramian(gramian)  # the weights are scale invariant
        mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
        fallback = self.no_fallback(a)
        weights = mean
        if self.c > 0:
            w = cagrad_dual_weights(a, self.c)
            g0_norm = torch.sqrt(torch.clamp(mean @ a @ mean, min=0.0))
            gw_norm = torch.sqrt(torch.clamp(w @ a @ w, min=0.0))
            usable = gw_norm > 1e-12 * torch.clamp(g0_norm, min=1e-300)
            lam = self.c * g0_norm / torch.where(usable, gw_norm, 1.0)
            weights = torch.where(usable, mean + lam * w, mean)
            fallback = ~usable & (g0_norm > 0)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return weights / divisor, fallback
