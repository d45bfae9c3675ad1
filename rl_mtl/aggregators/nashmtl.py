"""Nash-MTL (Navon et al., ICML 2022), with fixed bargaining powers if given (the asymmetric form;
``auxinash`` learns them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, AggregatorError, State, check_choice, check_option, normalize_gramian
from .solvers import fair_residual, fair_weights

SOLVERS = ("newton", "cvxpy")
# The unregularised condition must hold to this relative accuracy, or the call counts as a
# fallback (the Nash solution does not exist for this Gramian and the ridge decided the weights).
EXISTENCE_TOL = 1e-3


class NashMTL(Aggregator):
    """The Nash bargaining weights: the unique alpha > 0 with M alpha = p / alpha.

    Options:
      update_weights_every: use new weights every N calls and the last ones in between (the
        paper's 1 / 50 / 100). The choice is a select on the device (the state's call counter),
        so the solve itself runs on every call: what a compiled update replays.
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

    State: ``fallbacks``; ``calls`` (how many calls so far); ``last`` (the weights the calls
    between two solves reuse, float64); ``powers`` (p); ``alpha`` (the last solution, before
    ``max_norm``).
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
        check_option("nashmtl", "update_weights_every", update_weights_every, 1, integer=True)
        check_choice("nashmtl", "solver", solver, SOLVERS)
        check_option("nashmtl", "max_norm", max_norm, 0, note=" (0 disables it)")
        if powers is not None:
            if not isinstance(powers, list) or not powers:
                raise AggregatorError(f"nashmtl: powers must be a list of positive numbers, got {powers!r}")
            for q in powers:
                check_option("nashmtl", "each of powers", q, 0, strict=True)
        check_option("nashmtl", "optim_niter", optim_niter, 1, integer=True)
        if solver == "cvxpy":
            from .reference import require_conic_solver

            require_conic_solver()  # fail now, not at the first update
        self.update_weights_every = update_weights_every
        self.solver = solver
        self.max_norm = float(max_norm)
        self.powers = None if powers is None else [float(q) for q in powers]
        self.optim_niter = optim_niter

    def options(self) -> dict[str, Any]:
        return {
            "update_weights_every": self.update_weights_every,
            "solver": self.solver,
            "max_norm": self.max_norm,
            "powers": self.powers,
            "optim_niter": self.optim_niter,
        }

    def init_state(self, k: int, device: torch.device | str = "cpu") -> State:
        if self.powers is not None and len(self.powers) != k:
            raise AggregatorError(f"{self.name}: {len(self.powers)} bargaining powers given for {k} tasks")
        powers = torch.ones(k, dtype=torch.float64) if self.powers is None else torch.tensor(self.powers)
        return {
            **super().init_state(k, device),
            "calls": torch.zeros((), dtype=torch.int64, device=device),
            "last": torch.zeros(k, dtype=torch.float64, device=device),
            "powers": powers.to(dtype=torch.float64, device=device),
            "alpha": torch.zeros(k, dtype=torch.float64, device=device),  # the last solution, before max_norm
        }

    def weigh(self, gramian: Tensor | None, losses: Tensor, state: State, uniform: Tensor) -> tuple[Tensor, State]:
        assert gramian is not None, f"{self.name} needs the Gramian"
        k = losses.shape[-1]
        m = gramian.detach().to(torch.float64)
        finite = torch.isfinite(m).all()
        alpha, fallback = self.bargain(torch.where(finite, m, torch.eye(k, dtype=m.dtype, device=m.device)),
                                       state["powers"])  # fmt: skip
        ok = finite & torch.isfinite(alpha).all()
        weights = torch.where(ok, self.clip_norm(alpha, m), torch.full_like(alpha, 1.0 / k)).to(gramian.dtype)
        calls = state["calls"]
        solves = calls % self.update_weights_every == 0
        # A non-finite Gramian (a skipped update) must not set the weights reused until the next
        # solve, unless there are none yet.
        keep = solves & (finite | (calls == 0))
        return torch.where(solves, weights, state["last"].to(weights.dtype)), {
            **state,
            "fallbacks": state["fallbacks"] + ((fallback | ~ok) & solves).to(torch.int64),
            "calls": calls + 1,
            "last": torch.where(keep, weights.to(torch.float64), state["last"]),
            "alpha": torch.where(solves & ok, alpha, state["alpha"]),
        }

    @property
    def on_device(self) -> bool:
        return self.solver == "newton"

    def bargain(self, gramian: Tensor, powers: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha > 0 with M alpha = p / alpha for M = ``gramian`` (float64), fallback): the ridge
        fallback when no solution exists (see the class docstring)."""
        a, scale, degenerate = normalize_gramian(gramian)
        if self.solver == "newton":
            alpha = fair_weights(a, alpha=1.0, powers=powers)
        else:
            from .reference import nash_cvxpy

            alpha = nash_cvxpy(a, powers=powers, optim_niter=self.optim_niter)
        fallback = degenerate | ~(fair_residual(a, alpha, 1.0, powers) < EXISTENCE_TOL)
        return alpha / scale.sqrt(), fallback  # M = scale * A  =>  alpha_M = alpha_A / sqrt(scale)

    def clip_norm(self, alpha: Tensor, gramian: Tensor) -> Tensor:
        """alpha scaled so that |sum_i alpha_i g_i| <= max_norm (when max_norm > 0)."""
        if self.max_norm == 0:
            return alpha
        norm = torch.sqrt(torch.clamp(alpha @ gramian @ alpha, min=0.0))
        return alpha * torch.clamp(self.max_norm / norm, max=1.0)
