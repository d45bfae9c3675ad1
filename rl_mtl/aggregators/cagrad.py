"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, check_choice, check_option, normalize_gramian
from .solvers import barrier_minimize, may_read_back

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

    return barrier_minimize(value, grad_hess, mean)


def cone_projection_weights(a: Tensor) -> Tensor:
    """Weights v >= 1/K with G^T v the point nearest g_0 of the cone {d : g_i . d >= 0 for all i}:
    v = 1/K + mu, mu = argmin_{mu >= 0} |g_0 + G^T mu|^2 (Moreau: g_0 minus its projection on the
    polar cone). Where the hull of the task gradients holds 0, CAGrad's best worst-task
    improvement is 0 and every d in its ball with g_i . d >= 0 for all i attains it; this is the
    one nearest the mean gradient (inside the ball whenever any is)."""
    k = a.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
    # A tiny ridge makes the minimiser unique and bounded: where G^T mu = 0 has solutions
    # (opposite tasks) the objective is flat along them, and the barrier would push mu to infinity.
    a_reg = a + 1e-10 * torch.eye(k, dtype=a.dtype, device=a.device)

    def value(mu: Tensor) -> Tensor:  # 0.5 |g_0 + G^T mu|^2 + 0.5e-10 |mu|^2, up to a constant
        return 0.5 * ((mu @ a_reg) * mu).sum(-1) + mu @ (a @ mean)

    def grad_hess(mu: Tensor) -> tuple[Tensor, Tensor]:
        return a_reg @ mu + a @ mean, a_reg

    return mean + barrier_minimize(value, grad_hess, mean, simplex=False)


class CAGrad(Aggregator):
    """d = g_0 + (c |g_0| / |g_w*|) g_w*, returned as weights on the task gradients.

    Options: c >= 0 (default 0.4; the MT10 configs use 0.9); rescale 0 (none), 1 (divide by
    1 + c^2, the reference code's default) or 2 (divide by 1 + c). The dual over the simplex
    is solved to optimality with a barrier Newton method, not with a fixed number of SGD steps.
    Where the dual's optimum has g_w* = 0 (the hull of the task gradients holds 0: exactly
    opposite tasks, say) the formula is 0/0 although the problem has optima: the best worst-task
    improvement is 0, and the direction is the optimum nearest g_0 (``cone_projection_weights``).
    Never falls back (non-finite input still gives the mean, counted).
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        check_option("cagrad", "c", c, 0)
        check_choice("cagrad", "rescale (0 none, 1 divide by 1+c^2, 2 by 1+c)", rescale, RESCALES)
        self.c = float(c)
        self.rescale = rescale

    def options(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        k = gramian.shape[0]
        a, _, _ = normalize_gramian(gramian)  # the weights are scale invariant
        mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
        weights = mean
        if self.c > 0:
            w = cagrad_dual_weights(a, self.c)
            g0_norm = torch.sqrt(torch.clamp(mean @ a @ mean, min=0.0))
            gw_norm = torch.sqrt(torch.clamp(w @ a @ w, min=0.0))
            usable = torch.isfinite(w).all() & (gw_norm > 1e-7 * g0_norm)
            w = torch.where(usable, w, mean)
            lam = self.c * g0_norm / torch.where(usable, gw_norm, 1.0)
            if may_read_back(a) and bool(usable):
                weights = mean + lam * w
            else:  # only where 0 is in the hull (or on the sync-free path, which cannot branch)
                weights = torch.where(usable, mean + lam * w, cone_projection_weights(a))
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return weights / divisor, self.no_fallback(a)
