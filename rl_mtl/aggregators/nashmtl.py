"""Nash-MTL (Navon et al., ICML 2022) and its asymmetric form (AuxiNash, Shamsian et al. 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, AggregatorError, normalize_gramian
from .solvers import fair_residual, fair_weights

SOLVERS = ("newton", "cvxpy")
# The unregularised condition must hold to this relative accuracy, or the call counts as a
# fallback (the Nash solution does not exist for this Gramian and the ridge decided the weights).
EXISTENCE_TOL = 1e-3


class NashMTL(Aggregator):
    """The Nash bargaining weights: the unique alpha > 0 with M alpha = p / alpha.

    Options:
      update_weights_every: solve every N calls and reuse the last weights in between (the
        paper's 1 / 50 / 100). The trainer asks ``needs_gramian()`` to skip the Gramian.
      solver: "newton" (native damped Newton on the device, default) or "cvxpy" (the published
        sequence of convex problems, run with an installed conic solver, on the host).
      max_norm: scale the weights so that |sum_i w_i g_i| <= max_norm (the published code
        clips the combined gradient at 1.0); 0 disables it.
      powers: bargaining powers p (K positive numbers; default all ones).
      optim_niter: iterations of the cvxpy solver (published default 20).

    Fallback (counted): when M is singular in a way that leaves no solution (a zero task
    gradient, two opposite tasks) the solve uses a tiny ridge, M + 1e-10 diag(M); the
    weights stay finite and the call is counted. A solve whose M is not finite returns the
    mean (counted) and keeps the previous weights for the calls that reuse them.
    """

    name = "nashmtl"

    def __init__(
        self,
        update_weights_every: int = 1,
        solver: str = "newton",
        max_norm: float = 1.0,
        powers: list[float] | None = None,
        optim_niter: int = 20,
    ) -> None:
        super().__init__()
        if not isinstance(update_weights_every, int) or update_weights_every < 1:
            raise AggregatorError(
                f"nashmtl: update_weights_every must be an integer >= 1, got {update_weights_every!r}"
            )
        if solver not in SOLVERS:
            raise AggregatorError(f"nashmtl: unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
        if not isinstance(max_norm, (int, float)) or max_norm < 0:
            raise AggregatorError(f"nashmtl: max_norm must be a number >= 0 (0 disables it), got {max_norm!r}")
        if powers is not None and (len(powers) == 0 or any(not (float(q) > 0) for q in powers)):
            raise AggregatorError(f"nashmtl: powers must be a list of positive numbers, got {powers!r}")
        if not isinstance(optim_niter, int) or optim_niter < 1:
            raise AggregatorError(f"nashmtl: optim_niter must be an integer >= 1, got {optim_niter!r}")
        if solver == "cvxpy":
            from .reference import require_conic_solver

            require_conic_solver()  # fail now, not at the first update
        self.update_weights_every = update_weights_every
        self.solver = solver
        self.max_norm = float(max_norm)
        self.powers = None if powers is None else [float(q) for q in powers]
        self.optim_niter = optim_niter
        self.step = 0
        self._last: Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {
            "update_weights_every": self.update_weights_every,
            "solver": self.solver,
            "max_norm": self.max_norm,
            "powers": self.powers,
            "optim_niter": self.optim_niter,
        }

    def needs_gramian(self) -> bool:
        """False on the calls that reuse the previous weights (no Gramian needed)."""
        return self._last is None or self.step % self.update_weights_every == 0

    def __call__(self, gramian: Tensor | None, losses: Tensor | None = None) -> Tensor:
        if not self.needs_gramian():
            self.step += 1
            assert self._last is not None
            if losses is not None:  # after a checkpoint load the cached weights are on the CPU
                self._last = self._last.to(losses.device)
            return self._last
        assert gramian is not None, "nashmtl: a Gramian is needed on this step (see needs_gramian())"
        return super().__call__(gramian, losses)

    def record(self, gramian: Tensor, weights: Tensor, fallback: Tensor) -> Tensor:
        weights = super().record(gramian, weights, fallback)
        self.step += 1
        if self._last is None or self._last.shape != weights.shape:
            self._last = weights
        else:  # a non-finite Gramian (a skipped update) must not set the weights reused until the next solve
            self._last = torch.where(torch.isfinite(gramian).all(), weights, self._last.to(weights.device))
        return weights

    def batchable(self) -> bool:
        return self.solver == "newton"

    def _weights(self, gramian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        k = gramian.shape[0]
        if self.powers is not None and len(self.powers) != k:
            raise AggregatorError(f"nashmtl: {len(self.powers)} bargaining powers given for {k} tasks")
        p = None if self.powers is None else torch.tensor(self.powers, dtype=gramian.dtype, device=gramian.device)
        a, scale, degenerate = normalize_gramian(gramian)
        if self.solver == "newton":
            alpha = fair_weights(a, alpha=1.0, powers=p)
        else:
            from .reference import nash_cvxpy

            alpha = nash_cvxpy(a, powers=p, optim_niter=self.optim_niter)
        fallback = degenerate | ~(fair_residual(a, alpha, 1.0, p) < EXISTENCE_TOL)
        alpha = alpha / scale.sqrt()  # M = scale * A  =>  alpha_M = alpha_A / sqrt(scale)
        if self.max_norm > 0:
            norm = torch.sqrt(torch.clamp(alpha @ gramian @ alpha, min=0.0))
            alpha = alpha * torch.clamp(self.max_norm / norm, max=1.0)
        return alpha, fallback

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(step=self.step, last=None if self._last is None else self._last.detach().cpu())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])
        self._last = state["last"]
