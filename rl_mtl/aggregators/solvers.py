"""Native solvers for the small convex problems behind the aggregators.

``fair_weights`` (Nash-MTL, FairGrad) is a damped Newton method on K x K systems; ``active_set``
(MGDA, CAGrad) a primal active-set method over the simplex or the orthant. Both work in float64
with a fixed iteration budget, written without data-dependent Python branches inside an
iteration (the choices are tensor ops), so that they run without reading anything back to the
host. Where a read-back costs nothing (the CPU, ``may_read_back``) they stop as soon as they have
converged; elsewhere (the GPU, inside ``vmap`` over seeds, under ``sync_free()``, in a compiled
update) they run their whole budget, sized from measured convergence.
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
    # is_compiling() first: a traced graph then never reads (so never guards on) the global
    return not torch.compiler.is_compiling() and like.device.type == "cpu" and _sync_free_depth == 0


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


Face = Callable[[Tensor], Tensor]


def active_set(
    face: Face, gradient: Callable[[Tensor], Tensor], start: Tensor, free: Tensor, simplex: bool, max_iter: int
) -> tuple[Tensor, Tensor]:
    """Minimise a convex f over the probability simplex (``simplex``) or the orthant x >= 0 by a
    primal active-set method; returns (x, converged).

    ``free`` [K] (bool) marks the coordinates not held at 0 (the face of the feasible set the
    iterate is on); ``face(free)`` gives the minimiser of f over that face's affine hull (0 off
    ``free``, and sum x = 1 on the simplex; where f is unbounded below there, any point far
    along a descent ray), ``gradient(x)`` f's gradient. Each iteration moves from x toward the
    face's minimiser z. If a coordinate reaches 0 first, x stops there and that coordinate
    leaves ``free`` (f does not increase along the way: it is convex and f(z) <= f(x)). If z is
    reached, the KKT multipliers of the held coordinates decide: all >= 0 means z is optimal;
    otherwise the most negative one's coordinate joins ``free``. Converged iterations repeat
    themselves, so running the whole budget (the GPU path) returns the optimum too.

    Measured on 540 random Gramians (correlated, conflicting, rank-deficient, norms spread 100x),
    MGDA (from the uniform weights, all free) and CAGrad's dual (from its best vertex) took at
    most 15 iterations for K = 10, 23 for K = 20 and 63 for K = 50, against a budget of 2K + 2
    (``active_set_budget``), and reached cvxpy's optimum every time.
    """
    x = start
    read_back = may_read_back(x)
    index = torch.arange(x.shape[0], device=x.device)
    converged = torch.zeros((), dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        z = face(free)
        ratios = torch.where(free & (z < 0), x / (x - z), torch.inf)  # steps at which x_i reaches 0
        step, blocking = ratios.min(dim=0)
        reached = step >= 1
        g = gradient(z)
        # simplex: on the face, the gradient equals the sum constraint's multiplier nu everywhere
        nu = torch.where(free, g, 0.0).sum() / free.sum() if simplex else torch.zeros_like(step)
        lowest, entering = torch.where(free, torch.inf, g - nu).min(dim=0)
        optimal = lowest >= -1e-12 * (1.0 + nu.abs())
        converged = reached & optimal
        stopped = torch.where(index == blocking, 0.0, torch.lerp(x, z, step.clamp(max=1.0)))
        x = torch.where(reached, z, stopped)
        free = torch.where(reached, free | ((index == entering) & ~optimal), free & (index != blocking))
        if read_back and bool(converged):
            break
    return x, converged


def active_set_budget(k: int) -> int:
    """``active_set``'s iterations: 2K + 2 (see its measurements)."""
    return 2 * k + 2


def face_solve(a: Tensor, free: Tensor, rhs: Tensor) -> Tensor:
    """Y [K, R] with A_FF Y_F = rhs_F and Y = 0 off F = ``free``: one K x K solve, the held rows
    and columns replaced by the identity's (so that a batched or compiled solve keeps its shape)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    system = torch.where(free[:, None] & free[None, :], a, eye)
    return torch.linalg.solve_ex(system, torch.where(free[:, None], rhs, 0.0))[0]


def with_ridge(a: Tensor, ridge: float = 1e-13) -> Tensor:
    """A + ridge * mean(diag A) I: unique face minimisers where the Gramian is singular on a face
    (duplicate or opposite tasks), at a cost of ~ridge in the objective."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return a + ridge * torch.diagonal(a).mean() * eye
