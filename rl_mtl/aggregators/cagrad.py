"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, check_choice, check_option, normalize_gramian
from .solvers import active_set, active_set_budget, face_solve, may_read_back, with_ridge

RESCALES = (0, 1, 2)


def cagrad_dual_weights(a: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """The dual solution w* = argmin_{w in simplex} w . b + rho |g_w| (b_i = g_i . g_0, rho =
    c |g_0|), solved exactly (``active_set``); returns (w*, converged).

    On a face F it has a closed form. Over the face's affine hull, w = u + t y with u the min-norm
    point (u = A_FF^-1 1 / s, s = 1^T A_FF^-1 1, so |g_u|^2 = 1/s and g_u . g_y = 0 for every
    y with 1^T y = 0); the best y for a given |g_y| is along v = (1^T A_FF^-1 b / s) A_FF^-1 1
    - A_FF^-1 b, which makes f(u + t v) = b.u - t v^T A v + rho sqrt(1/s + t^2 v^T A v),
    minimised at t = sqrt((1/s) / (rho^2 - v^T A v)). Where rho^2 <= v^T A v, f is unbounded
    below on the hull and the point is taken far along v (the iteration then stops at a vertex
    of the face on the way)."""
    k = a.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
    b = a @ mean  # g_i . g_0
    radius = c * torch.sqrt(torch.clamp(mean @ b, min=0.0))  # rho = c |g_0|
    a_reg = with_ridge(a)
    rhs = torch.stack([torch.ones_like(b), b], dim=1)

    def face(free: Tensor) -> Tensor:
        y = face_solve(a_reg, free, rhs)
        y_ones, y_b = y[:, 0], y[:, 1]
        s, ones_y_b = y_ones.sum(), y_ones @ b
        u = y_ones / s
        v = (ones_y_b / s) * y_ones - y_b
        v_a_v = torch.clamp(b @ y_b - ones_y_b**2 / s, min=0.0)
        bounded = radius**2 > v_a_v
        t = torch.sqrt(torch.clamp(1.0 / s, min=0.0) / torch.where(bounded, radius**2 - v_a_v, 1.0))
        far = (2.0 + u.abs().max()) / torch.clamp(-v.min(), min=1e-300)  # past the face's boundary
        return u + torch.where(bounded, t, far) * v

    def gradient(w: Tensor) -> Tensor:
        aw = a_reg @ w
        return b + radius * aw / torch.sqrt(torch.clamp(w @ aw, min=1e-300))

    # From the best vertex: the dual's optimum usually weighs a few tasks (the most conflicting).
    vertex = torch.argmin(b + radius * torch.sqrt(torch.clamp(torch.diagonal(a), min=0.0)))
    free = torch.arange(k, device=a.device) == vertex
    return active_set(face, gradient, free.to(a.dtype), free, simplex=True, max_iter=active_set_budget(k))


def cone_projection_weights(a: Tensor) -> tuple[Tensor, Tensor]:
    """Weights v >= 1/K with G^T v the point nearest g_0 of the cone {d : g_i . d >= 0 for all i}:
    v = 1/K + mu, mu = argmin_{mu >= 0} |g_0 + G^T mu|^2 (Moreau: g_0 minus its projection on the
    polar cone); returns (v, converged). Where the hull of the task gradients holds 0, CAGrad's
    best worst-task improvement is 0 and every d in its ball with g_i . d >= 0 for all i attains
    it; this is the one nearest the mean gradient (inside the ball whenever any is). Solved
    exactly over the orthant (``active_set``; a tiny ridge makes the minimiser unique where
    G^T mu = 0 has solutions, opposite tasks)."""
    k = a.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=a.dtype, device=a.device)
    a_reg = with_ridge(a, 1e-10)
    b = a @ mean

    def face(free: Tensor) -> Tensor:  # 0.5 mu^T A mu + b . mu over the face's coordinates
        return -face_solve(a_reg, free, b[:, None])[:, 0]

    free = torch.zeros(k, dtype=torch.bool, device=a.device)
    mu, converged = active_set(face, lambda mu: a_reg @ mu + b, torch.zeros_like(mean), free, simplex=False,
                               max_iter=active_set_budget(k))  # fmt: skip
    return mean + mu, converged


class CAGrad(Aggregator):
    """d = g_0 + (c |g_0| / |g_w*|) g_w*, returned as weights on the task gradients.

    Options: c >= 0 (default 0.4; the MT10 configs use 0.9); rescale 0 (none), 1 (divide by
    1 + c^2, the reference code's default) or 2 (divide by 1 + c). The dual over the simplex
    is solved exactly with an active-set method, not with a fixed number of SGD steps.
    Where the dual's optimum has g_w* = 0 (the hull of the task gradients holds 0: exactly
    opposite tasks, say) the formula is 0/0 although the problem has optima: the best worst-task
    improvement is 0, and the direction is the optimum nearest g_0 (``cone_projection_weights``).
    Of the two candidates the one with the better worst-task improvement inside the ball is
    taken. Fallback (counted): neither is finite, converged and inside the ball (non-finite input
    gives the mean, counted, too).
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

            w, converged = cagrad_dual_weights(a, self.c)
            gw_norm = torch.sqrt(torch.clamp(w @ a @ w, min=0.0))
            usable = converged & torch.isfinite(w).all() & (gw_norm > 0)
            dual = mean + torch.sqrt(radius_sq) / torch.where(usable, gw_norm, 1.0) * torch.where(usable, w, 0.0)
            dual_value = torch.where(usable, feasible_value(dual), -torch.inf)
            if may_read_back(a) and bool(dual_value > 1e-9):
                weights = dual  # a positive improvement: 0 is not in the hull, the dual's formula holds
            else:  # the cone's point wins where the formula is 0/0 (or fails); the sync-free path takes both
                cone, cone_converged = cone_projection_weights(a)
                cone_value = torch.where(cone_converged, feasible_value(cone), -torch.inf)
                best = torch.maximum(dual_value, cone_value)
                weights = torch.where(dual_value >= cone_value, dual, cone)
                weights = torch.where(torch.isfinite(best), weights, mean)
                fallback = ~torch.isfinite(best)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return weights / divisor, fallback
