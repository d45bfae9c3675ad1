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
    Of the two candidates the one with the better worst-task improvement inside the ball is
    taken. Fallback (counted): neither is finite and inside the ball (non-finite input gives the
    mean, counted, too).
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
        weights, fallback = mean, self.no_fallback(a)
        if self.c > 0:
            radius_sq = self.c**2 * torch.clamp(mean @ a @ mean, min=0.0)

            def feasible_value(v: Tensor) -> Tensor:
                """The worst task improvement of the direction G^T v, -inf outside CAGrad's ball."""
                inside = (v - mean) @ a @ (v - mean) <= radius_sq * (1 + 1e-6) + 1e-15
                return torch.where(inside & torch.isfinite(v).all(), (a @ v).min(), -torch.inf)

            w = cagrad_dual_weights(a, self.c)
            gw_norm = torch.sqrt(torch.clamp(w @ a @ w, min=0.0))
            usable = torch.isfinite(w).all() & (gw_norm > 0)
            dual = mean + torch.sqrt(radius_sq) / torch.where(usable, gw_norm, 1.0) * torch.where(usable, w, 0.0)
            dual_value = feasible_value(dual)
            if may_read_back(a) and bool(dual_value > 1e-9):
                weights = dual  # a positive improvement: 0 is not in the hull, the dual's formula holds
            else:  # the cone's point wins where the formula is 0/0 (or fails); the sync-free path takes both
                cone = cone_projection_weights(a)
                cone_value = feasible_value(cone)
                best = torch.maximum(dual_value, cone_value)
                weights = torch.where(dual_value >= cone_value, dual, cone)
                weights = torch.where(torch.isfinite(best), weights, mean)
                fallback = ~torch.isfinite(best)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return weights / divisor, fallback
