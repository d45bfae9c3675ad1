"""FairGrad (Ban & Ji, ICML 2024): alpha-fair utility maximisation."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Aggregator, check_choice, check_option, normalize_gramian
from .nashmtl import EXISTENCE_TOL
from .solvers import fair_residual, fair_weights

SOLVERS = ("newton", "scipy")


class FairGrad(Aggregator):
    """The weights w > 0 with M w = w^(-1/alpha) (element-wise); alpha = 1 is Nash-MTL's condition.

    Options: alpha > 0 (default 2.0, the MT10 setting); solver "newton" (native, default) or
    "scipy" (the published formulation: scipy.optimize.least_squares on M w - w^(-1/alpha),
    on the host; kept as a reference).

    Unlike Nash-MTL the weights are not rescaled: if M is multiplied by s they scale by
    s^(-alpha/(alpha+1)). Fallback (counted): a singular M with no solution is solved with a
    tiny ridge, as for Nash-MTL.
    """

    name = "fairgrad"

    def __init__(self, alpha: float = 2.0, solver: str = "newton") -> None:
        check_option("fairgrad", "alpha", alpha, 0, strict=True)
        check_choice("fairgrad", "solver", solver, SOLVERS)
        self.alpha = float(alpha)
        self.solver = solver

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "solver": self.solver}

    @property
    def on_device(self) -> bool:
        return self.solver == "newton"

    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        a, scale, degenerate = normalize_gramian(gramian)
        if self.solver == "newton":
            w = fair_weights(a, alpha=self.alpha)
        else:
            from .reference import fairgrad_scipy

            w = fairgrad_scipy(a, self.alpha)
        fallback = degenerate | ~(fair_residual(a, w, self.alpha) < EXISTENCE_TOL)
        return w * scale.pow(-self.alpha / (self.alpha + 1.0)), fallback
