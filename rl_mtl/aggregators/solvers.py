"""Native solvers for the small convex problems behind the aggregators.

Both solvers are damped Newton methods on K x K systems, in float64, with a fixed iteration
budget and a *parallel* backtracking line search (all step sizes 1, 1/2, 1/4, ... are tried at
once and the largest acceptable one is taken with tensor ops). That keeps them free of
data-dependent Python branches inside an iteration, so that they run without reading anything
back to the host. Where a read-back costs nothing (the CPU, ``may_read_back``) they stop as soon
as they have converged; elsewhere (the GPU, inside ``vmap`` over seeds, under ``sync_free()``)
they run their whole budget, sized from measured convergence (``fair_weights``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_sync_free_depth = 0  # a plain global, not a ContextVar: torch.compile can trace (and guard on) it


@contextlib.contextmanager
def sync_free() -> Iterator[None]:
    """Solve without reading anything back to the host, whatever the device: what the GPU path
    does, and what a batched (``vmap``) or compiled call needs; the tests use it to check the
    GPU path on the CPU."""
    global _sync_free_depth
    _sync_free_depth += 1
    try:
        yield
    finally:
        _sync_free_depth -= 1


def may_read_back(like: Tensor) -> bool:
    """Whether a solver may test convergence on the host: only on the CPU, where the test costs
    nothing, and not while a compiled graph is traced (it would break the graph); on the GPU it
    would stall the stream in the middle of every update."""
    return like.device.type == "cpu" and _sync_free_depth == 0 and not torch.compiler.is_compiling()


# Step sizes tried by the line search: 1, 1/2, ..., 2^-39.
_N_STEPS = 40
_ARMIJO = 1e-4


def _trial_steps(like: Tensor) -> Tensor:
    """[1 + T]: 0 (the current point, whose value the search needs anyway), then 1, 1/2, ...,
    2^-39. Made once per solve."""
    halvings = torch.pow(0.5, torch.arange(_N_STEPS, dtype=like.dtype, device=like.device))
    return torch.cat([halvings.new_zeros(1), halvings])


def _line_search(objective: Callable[[Tensor], Tensor], x: Tensor, dx: Tensor, slope: Tensor, steps: Tensor) -> Tensor:
    """The largest of ``steps`` (``_trial_steps``) keeping x + t dx > 0 with sufficient
    decrease; 0 if none. All are tried at once: one batched evaluation of the objective."""
    candidates = torch.addcmul(x, steps[:, None], dx)  # [1 + T, K]; row 0 is x itself
    feasible = (candidates > 0).all(dim=-1)
    values = objective(torch.where(feasible[:, None], candidates, x))
    f0 = values[0]
    # The relative slack absorbs float64 rounding near the optimum, where decreases are ~1e-16.
    accept = feasible & (values <= torch.addcmul(f0 + 1e-13 * f0.abs(), steps, slope, value=_ARMIJO))
    return torch.where(accept, steps, 0.0).max()


def _utility(w: Tensor, alpha: float) -> Tensor:
    """The alpha-fair utility h(w) with h'(w) = w^(-1/alpha): log for alpha = 1."""
    if alpha == 1.0:
        return torch.log(w)
    e = 1.0 - 1.0 / alpha
    return w.pow(e) / e


def fair_weights(
    a: Tensor,
    alpha: float = 1.0,
    powers: Tensor | None = None,
    ridge: float = 1e-10,
    max_iter: int | None = None,
) -> Tensor:
    """Solve (A w)_i = p_i w_i^(-1/alpha), w > 0, for a PSD matrix A (float64, mean diag ~ 1).

    This is the stationarity condition of the strictly convex function
    f(w) = 0.5 w^T A w - sum_i p_i h_alpha(w_i), minimised here by damped Newton. alpha = 1 is
    Nash-MTL (M w = p / w), alpha > 0 otherwise is FairGrad. A small ridge keeps the minimiser
    finite when A is singular (a zero task gradient, opposite tasks); callers check the
    unregularised condition afterwards and count a fallback when it fails.

    ``max_iter`` (default ``newton_budget(alpha)``) bounds the iterations; where the solver may
    read back (CPU) it stops once converged, elsewhere it runs them all. Measured: from the start
    below, alpha = 1 converged within 17 iterations on every Gramian of a 300-update MT10 run
    (critic and actor, condition numbers up to 7e5) and within 14 on random ones with K up to
    100 and norms spread 100x; alpha = 2 within 16 there, alpha = 5 needs more.

    For alpha = 1, f / min(p) is self-concordant (a quadratic plus -log terms of weight >= 1),
    so Nesterov's damped step 1 / (1 + lambda), lambda the Newton decrement, stays positive and
    converges, quadratically once lambda is small (lambda+ <= 2 lambda^2), with no line search at
    all. Other alphas use the parallel backtracking line search.

    Each iteration solves the Newton system scaled by D = diag(w), for the relative step
    v = dw / w: (D A D + diag(p w^(1-1/alpha) / alpha)) v = p w^(1-1/alpha) - D A w. It is the
    same step, better conditioned when the weights span orders of magnitude, and fewer kernels
    (what an iteration costs on the GPU).
    """
    k = a.shape[0]
    p = torch.ones(k, dtype=a.dtype, device=a.device) if powers is None else powers.to(a)
    # The ridge is relative to each task's own squared norm (plus a floor for zero gradients),
    # so it perturbs the condition by ~ridge for every task, whatever the norms' spread.
    a_reg = a + ridge * torch.diag(torch.diagonal(a) + 1e-12)
    inv_alpha = 1.0 / alpha
    self_concordant = alpha == 1.0

    def objective(w: Tensor) -> Tensor:  # w: [..., K] -> [...]
        return 0.5 * ((w @ a_reg) * w).sum(-1) - (p * _utility(w, alpha)).sum(-1)

    # Start at the best point on the ray through 1/|g_i| (exact for orthogonal gradients).
    u = torch.diagonal(a_reg).rsqrt()
    curvature = u @ a_reg @ u
    pull = (p * u.pow(1.0 - inv_alpha)).sum()
    w = (pull / curvature).pow(alpha / (alpha + 1.0)) * u

    read_back = may_read_back(w)
    steps = None if self_concordant else _trial_steps(w)
    power_diag = torch.diag(p)  # the scaled Hessian's diagonal term when alpha = 1
    min_power = None if powers is None else p.min()
    ones = torch.ones_like(w)
    for _ in range(newton_budget(alpha) if max_iter is None else max_iter):
        pull = p if self_concordant else p * w.pow(1.0 - inv_alpha)  # p_i w_i h'(w_i)
        rhs = torch.addcmul(pull, w, a_reg @ w, value=-1.0)  # -D grad
        diagonal = power_diag if self_concordant else torch.diag(pull * inv_alpha)
        v = torch.linalg.solve_ex(torch.addcmul(diagonal, a_reg, torch.outer(w, w)), rhs)[0]
        decrement_sq = rhs @ v  # lambda^2 = grad^T H^-1 grad
        if self_concordant:
            scaled = decrement_sq if min_power is None else decrement_sq / min_power
            step = torch.reciprocal(1.0 + torch.sqrt(torch.clamp(scaled, min=0.0)))
        else:
            step = _line_search(objective, w, w * v, -decrement_sq, steps)
        w = w * torch.addcmul(ones, v, step)  # w (1 + step v)
        # lambda^2 ~ 1e-18 before a full step means the residual is ~1e-18 after it.
        if read_back and bool(decrement_sq < 1e-18 * k):
            break
    return w


def newton_budget(alpha: float) -> int:
    """Newton iterations ``fair_weights`` allows: twice the most measured for Nash-MTL (self-
    concordant, no line search), and 60 for the other alphas (line-searched, slower to settle).
    Only the ridge-dominated problems, which have no solution and count as fallbacks, use it up."""
    return 32 if alpha == 1.0 else 60


def fair_residual(a: Tensor, w: Tensor, alpha: float, powers: Tensor | None = None) -> Tensor:
    """max_i |(A w)_i w_i^(1/alpha) / p_i - 1|: how far w is from the fairness condition."""
    p = 1.0 if powers is None else powers.to(a)
    return ((a @ w) * w.pow(1.0 / alpha) / p - 1.0).abs().max()


def barrier_minimize(
    value: Callable[[Tensor], Tensor],
    grad_hess: Callable[[Tensor], tuple[Tensor, Tensor]],
    start: Tensor,
    simplex: bool = True,
    t_start: float = 1.0,
    t_factor: float = 10.0,
    t_final: float = 1e14,
    newton_per_t: int = 4,
) -> Tensor:
    """Minimise a smooth convex F over the probability simplex (``simplex``) or the positive
    orthant with a log-barrier method, from the feasible point ``start``.

    Follows the central path of t F(w) - sum_i log w_i (subject to sum w = 1 on the simplex),
    multiplying t by ``t_factor`` after ``newton_per_t`` Newton steps. At t the duality gap is
    at most K / t, so the default schedule ends with a gap below 1e-12 for K <= 100.
    ``value`` takes a batch [..., K]; ``grad_hess`` one point [K].
    """
    w = start
    ones = torch.ones_like(w)
    read_back = may_read_back(w)
    steps = _trial_steps(w)
    t = t_start
    while True:
        tt = t

        def barrier_value(x: Tensor, tt: float = tt) -> Tensor:
            return tt * value(x) - torch.log(x).sum(-1)

        for _ in range(newton_per_t):
            g, h = grad_hess(w)
            g = tt * g - 1.0 / w
            h = tt * h + torch.diag(1.0 / (w * w))
            if simplex:  # on the plane sum(dw) = 0: dw = -H^-1 (g + nu 1), nu from 1^T dw = 0
                sol = torch.linalg.solve_ex(h, torch.stack([g, ones], dim=1))[0]
                nu = -sol[:, 0].sum() / sol[:, 1].sum()
                dw = -(sol[:, 0] + nu * sol[:, 1])
                dw = dw - dw.mean()  # remove rounding drift off the plane
            else:
                dw = -torch.linalg.solve_ex(h, g)[0]
            slope = g @ dw  # -lambda^2: the Newton decrement of the barrier problem
            w = torch.addcmul(w, _line_search(barrier_value, w, dw, slope, steps), dw)
            if read_back and bool(slope > -1e-12):
                break  # centred for this t
        if t >= t_final:
            return w
        t = min(t * t_factor, t_final)
