"""Host-side reference solvers (cvxpy, scipy): the published formulations, kept to cross-check
the native solvers and selectable where a method offers ``solver=...``. They take and return
float64 tensors; the work happens in numpy on the CPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import AggregatorError

# Exponential-cone solvers able to run the log-constrained problems, in order of preference.
# (ECOS, the published choice, stalls at 'optimal_inaccurate' on ill-conditioned Gramians.)
CONIC_SOLVERS = ("CLARABEL", "SCS")


# Tight tolerances: these solvers are the yardstick the native ones are measured against.
_TIGHT = {"CLARABEL": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}, "SCS": {"eps": 1e-9}}


def _solve(problem: Any) -> None:
    solver = require_conic_solver()
    problem.solve(solver=solver, **_TIGHT[solver])


def require_conic_solver() -> str:
    """Name of an installed exponential-cone solver for cvxpy, or a clear error."""
    try:
        import cvxpy as cp
    except ImportError as err:  # pragma: no cover - cvxpy is a declared dependency
        raise AggregatorError(
            "solver='cvxpy' needs the cvxpy package: pip install 'cvxpy>=1.5' clarabel "
            "(or use the native solver='newton')"
        ) from err
    installed = set(cp.installed_solvers())
    for name in CONIC_SOLVERS:
        if name in installed:
            return name
    raise AggregatorError(
        f"solver='cvxpy' needs one of the conic solvers {', '.join(CONIC_SOLVERS)}, but cvxpy has only "
        f"{', '.join(sorted(installed)) or 'none'}: pip install clarabel (or use solver='newton')"
    )


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@lru_cache(maxsize=16)
def _nash_problem(k: int, log_form: bool = False) -> tuple[Any, ...]:
    """One convex step of the published method, as a DPP problem compiled once per K.

    The Nash condition is phi_i(alpha) = log alpha_i + log (A alpha)_i = log p_i. Each step
    minimises the linear function 1^T A alpha + grad(phi)(alpha_t) . alpha, i.e. sum(A alpha) plus
    the linearisation of the concave phi = sum_i phi_i at the previous iterate, subject to the
    convex constraints phi_i(alpha) >= log p_i. At a fixed point the constraints are active.
    The constraint alpha_i (A alpha)_i >= p_i is written as the equivalent second-order cone
    |(2 sqrt(p_i), alpha_i - (A alpha)_i)| <= alpha_i + (A alpha)_i rather than with logs:
    the same set, but solvers handle it far more reliably than exponential cones.
    ``log_form=True`` keeps the published log constraints (exponential cones), for benchmarks.
    """
    import cvxpy as cp

    alpha = cp.Variable(k, nonneg=True)
    gram = cp.Parameter((k, k))
    phi_grad = cp.Parameter(k)
    two_sqrt_powers = cp.Parameter(k, nonneg=True)
    a_alpha = gram @ alpha
    if log_form:
        constraints = [cp.log(alpha[i]) + cp.log(a_alpha[i]) >= 2 * cp.log(two_sqrt_powers[i] / 2) for i in range(k)]
    else:
        constraints = [
            cp.SOC(alpha[i] + a_alpha[i], cp.hstack([two_sqrt_powers[i], alpha[i] - a_alpha[i]])) for i in range(k)
        ]
    problem = cp.Problem(cp.Minimize(cp.sum(a_alpha) + phi_grad @ alpha), constraints)
    return problem, alpha, gram, phi_grad, two_sqrt_powers


def nash_cvxpy(
    a: Tensor, powers: Tensor | None = None, optim_niter: int = 20, tol: float = 1e-9, published: bool = False
) -> Tensor:
    """Nash-MTL's sequence of convex problems, on A (PSD, mean diagonal 1).

    ``published=True`` runs it as the reference code does, for the benchmark: log-form
    constraints, the start alpha = 1, the solver's default tolerances, and its stopping rule
    |A alpha - p/alpha| < 1e-3.
    """
    import cvxpy as cp

    k = a.shape[0]
    gram_np = _to_numpy(a)
    p = np.ones(k) if powers is None else _to_numpy(powers)
    problem, alpha, gram, phi_grad, two_sqrt_powers = _nash_problem(k, log_form=published)
    gram.value = gram_np
    two_sqrt_powers.value = 2.0 * np.sqrt(p)
    # Start on the ray through 1/|g_i|, scaled to satisfy the condition on average.
    u = 1.0 / np.sqrt(np.maximum(np.diag(gram_np), 1e-300))
    current = np.ones(k) if published else u * np.sqrt(p.sum() / max(u @ gram_np @ u, 1e-300))
    for _ in range(optim_niter):
        if published and np.linalg.norm(gram_np @ current - p / current) < 1e-3:
            break
        a_current = gram_np @ current
        # The linearisation needs (A alpha_t)_i > 0; a start that lacks it takes one step on
        # sum(A alpha) alone, whose solution is feasible and so has (A alpha)_i > 0.
        usable = bool((a_current > 0).all())
        phi_grad.value = 1.0 / current + gram_np.T @ (1.0 / a_current) if usable else np.zeros(k)
        try:
            problem.solve(solver=require_conic_solver()) if published else _solve(problem)
        except cp.error.SolverError:
            break  # numerically hard step: keep the last iterate; the caller checks the residual
        if alpha.value is None:
            break
        previous, current = current, np.maximum(alpha.value, 1e-300)
        residual = np.abs(current * (gram_np @ current) / p - 1.0).max()
        if residual < tol or np.abs(current - previous).max() < tol * np.abs(current).max():
            break
    return torch.as_tensor(current, dtype=a.dtype).to(a.device)


def fairgrad_scipy(a: Tensor, alpha: float) -> Tensor:
    """FairGrad's published formulation: least squares on A w - w^(-1/alpha), w >= 0."""
    from scipy.optimize import least_squares

    gram = _to_numpy(a)
    k = gram.shape[0]

    def condition(w: np.ndarray) -> np.ndarray:
        return gram @ w - np.power(w, -1.0 / alpha)

    result = least_squares(condition, np.ones(k) / k, bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return torch.as_tensor(result.x, dtype=a.dtype).to(a.device)


def _gram_root(gram: np.ndarray) -> np.ndarray:
    """R with R^T R = A (so |R^T w| ... is |g_w| up to rotation): from the eigendecomposition."""
    eigvals, eigvecs = np.linalg.eigh(gram)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))).T


def mgda_cvxpy(a: Tensor) -> Tensor:
    """The min-norm point of the convex hull as a QP over the simplex."""
    import cvxpy as cp

    gram = _to_numpy(a)
    k = gram.shape[0]
    w = cp.Variable(k)
    root = _gram_root(gram)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(root @ w)), [w >= 0, cp.sum(w) == 1])
    _solve(problem)
    return torch.as_tensor(w.value, dtype=a.dtype).to(a.device)


def cagrad_cvxpy(a: Tensor, c: float) -> Tensor:
    """CAGrad's dual as an SOCP: argmin_{w in simplex} w^T A 1/K + c |g_0| |R w|."""
    import cvxpy as cp

    gram = _to_numpy(a)
    k = gram.shape[0]
    mean = np.ones(k) / k
    radius = c * np.sqrt(max(mean @ gram @ mean, 0.0))
    w = cp.Variable(k)
    root = _gram_root(gram)
    problem = cp.Problem(cp.Minimize((gram @ mean) @ w + radius * cp.norm(root @ w, 2)), [w >= 0, cp.sum(w) == 1])
    _solve(problem)
    return torch.as_tensor(w.value, dtype=a.dtype).to(a.device)


def cagrad_primal_cvxpy(a: Tensor, c: float) -> tuple[Tensor, float]:
    """CAGrad's problem as stated, with no dual: the weights v of d = G^T v that maximise the worst
    task improvement min_i g_i . d = min_i (A v)_i within |d - g_0| <= c |g_0|, as an SOCP over
    (v, t). Returns (v, the best worst improvement). Where the optimum is not unique (the hull of
    the gradients holds 0) the solver's v is one of many; the value is what to compare."""
    import cvxpy as cp

    gram = _to_numpy(a)
    k = gram.shape[0]
    mean = np.ones(k) / k
    radius = c * np.sqrt(max(mean @ gram @ mean, 0.0))
    v, t = cp.Variable(k), cp.Variable()
    root = _gram_root(gram)
    problem = cp.Problem(cp.Maximize(t), [gram @ v >= t, cp.norm(root @ (v - mean), 2) <= radius])
    _solve(problem)
    return torch.as_tensor(v.value, dtype=a.dtype).to(a.device), float(t.value)


def cagrad_slsqp(a: Tensor, c: float) -> Tensor:
    """CAGrad's dual solved as its authors' code does: SLSQP (scipy's defaults) from the uniform
    weights on w . (A 1/K) + c |g_0| sqrt(w^T A w + 1e-8), with bounds 0 <= w <= 1 and sum w = 1.
    The benchmarks' yardstick for the native solver's speed."""
    from scipy.optimize import minimize

    gram = _to_numpy(a)
    k = gram.shape[0]
    mean = np.ones(k) / k
    linear = gram @ mean
    radius = c * np.sqrt(max(mean @ linear, 0.0))

    def objective(w: np.ndarray) -> float:
        return float(w @ linear + radius * np.sqrt(w @ gram @ w + 1e-8))

    result = minimize(objective, mean, bounds=[(0.0, 1.0)] * k,
                      constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum()},))  # fmt: skip
    return torch.as_tensor(result.x, dtype=a.dtype).to(a.device)


def mgda_frank_wolfe(a: Tensor, epsilon: float = 1e-3, max_iters: int = 250) -> Tensor:
    """The min-norm point by Frank-Wolfe, as Sener & Koltun's MGDA-UB and torchjd's MGDA run it:
    from the uniform weights, each iteration moves toward the vertex of least (A w)_i by the exact
    line search between the two points, until the weights change by less than ``epsilon`` (L1)
    or after ``max_iters``. The benchmarks' yardstick for the native solver's speed."""
    gram = _to_numpy(a)
    k = gram.shape[0]
    w = np.ones(k) / k
    for _ in range(max_iters):
        aw = gram @ w
        t = int(np.argmin(aw))
        current, cross, vertex = w @ aw, aw[t], gram[t, t]  # |g_w|^2, g_w . g_t, |g_t|^2
        denominator = current - 2.0 * cross + vertex
        step = 1.0 if denominator <= 0 else min(max((current - cross) / denominator, 0.0), 1.0)
        new = (1.0 - step) * w
        new[t] += step
        change = np.abs(new - w).sum()
        w = new
        if change < epsilon:
            break
    return torch.as_tensor(w, dtype=a.dtype).to(a.device)
