"""Aggregators: each method's defining condition, independent formulations, invariances,
degenerate inputs and clear errors."""

import contextlib
import math
import warnings

import pytest
import torch
from conftest import aggregator, random_gramian

from rl_mtl.aggregators import AGGREGATORS, AggregatorError, aggregate, make_aggregator
from rl_mtl.aggregators.base import normalize_gramian
from rl_mtl.aggregators.cagrad import cagrad_dual_weights
from rl_mtl.aggregators.mgda import min_norm_weights
from rl_mtl.aggregators.pcgrad import pcgrad_weights
from rl_mtl.aggregators.reference import cagrad_cvxpy, cagrad_primal_cvxpy, mgda_cvxpy
from rl_mtl.aggregators.solvers import sync_free

SIZES = [2, 3, 5, 10, 20, 50]
ALL_METHODS = sorted(AGGREGATORS)


@pytest.fixture(autouse=True)
def _quiet_cvxpy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# --- Nash-MTL ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", SIZES)
def test_nashmtl_satisfies_bargaining_condition(k):
    for seed in range(3):
        m = random_gramian(k, seed, spread=10.0)
        alpha = make_aggregator("nashmtl", max_norm=0)(m)
        product = alpha * (m @ alpha)
        assert torch.all(alpha > 0)
        assert torch.allclose(product, torch.ones(k, dtype=m.dtype), rtol=0, atol=1e-6), product


@pytest.mark.parametrize("k", SIZES)
def test_nashmtl_newton_and_cvxpy_solvers_agree(k):
    for seed in range(3):
        m = random_gramian(k, 100 + seed)
        native = make_aggregator("nashmtl", max_norm=0)(m)
        agg = make_aggregator("nashmtl", max_norm=0, solver="cvxpy")
        reference = agg(m)
        assert agg.fallbacks == 0
        rel = ((native - reference).abs() / reference.abs()).max()
        assert rel < 1e-4, f"native and cvxpy Nash weights differ by {rel:.2e} (K={k})"


def test_nashmtl_asymmetric_powers_condition():
    m = random_gramian(6, 7)
    powers = [1.0, 2.0, 0.5, 3.0, 1.0, 0.25]
    alpha = make_aggregator("nashmtl", max_norm=0, powers=powers)(m)
    assert torch.allclose(alpha * (m @ alpha), torch.tensor(powers, dtype=m.dtype), rtol=1e-6, atol=0)
    reference = make_aggregator("nashmtl", max_norm=0, powers=powers, solver="cvxpy")(m)
    assert torch.allclose(alpha, reference, rtol=1e-4)


def test_nashmtl_update_norm_is_sqrt_k_and_max_norm_clips():
    m = random_gramian(10, 3) * 1e6
    alpha = make_aggregator("nashmtl", max_norm=0)(m)
    assert math.isclose(float(alpha @ m @ alpha), 10.0, rel_tol=1e-6)  # |d|^2 = sum alpha_i (M alpha)_i = K
    clipped = make_aggregator("nashmtl", max_norm=1.0)(m)
    assert math.isclose(float(clipped @ m @ clipped), 1.0, rel_tol=1e-6)
    assert torch.allclose(clipped / clipped.sum(), alpha / alpha.sum())


def test_nashmtl_reuses_weights_between_solves_and_checkpoints_its_state():
    agg = make_aggregator("nashmtl", update_weights_every=3)
    m1, m2 = random_gramian(4, 1), random_gramian(4, 2)
    first = agg(m1)
    assert torch.equal(agg(m2), first) and torch.equal(agg(m2 * float("nan")), first)  # reused: M not read
    state = agg.state_dict()
    resumed = make_aggregator("nashmtl", update_weights_every=3)
    resumed.load_state_dict(state)
    new = agg(m2)  # the fourth call solves again
    assert torch.equal(new, resumed(m2)) and not torch.allclose(new, first)
    assert torch.equal(agg(m1), new)


def test_nashmtl_keeps_the_reused_weights_when_a_solve_sees_a_non_finite_gramian():
    agg = make_aggregator("nashmtl", update_weights_every=2)
    first = agg(random_gramian(4, 1))
    agg(random_gramian(4, 2))
    assert torch.allclose(agg(random_gramian(4, 3) * float("nan")), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.equal(agg(random_gramian(4, 4)), first), "a skipped update must not replace the reused weights"
    assert agg.fallbacks == 1


# --- FairGrad ------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k", SIZES)
def test_fairgrad_satisfies_its_condition(k, alpha):
    m = random_gramian(k, 11, spread=10.0)
    w = make_aggregator("fairgrad", alpha=alpha)(m)
    target = w.pow(-1.0 / alpha)
    assert torch.all(w > 0)
    assert torch.allclose(m @ w, target, rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_fairgrad_matches_published_least_squares(k):
    m = random_gramian(k, 12)
    native = make_aggregator("fairgrad", alpha=2.0)(m)
    reference = make_aggregator("fairgrad", alpha=2.0, solver="scipy")(m)
    assert torch.allclose(native, reference, rtol=1e-5)


def test_fairgrad_alpha_one_is_nashmtl():
    m = random_gramian(7, 13)
    assert torch.allclose(make_aggregator("fairgrad", alpha=1.0)(m), make_aggregator("nashmtl", max_norm=0)(m))


# --- CAGrad and MGDA against cvxpy ---------------------------------------------------------
@pytest.mark.parametrize("k", SIZES)
def test_mgda_matches_cvxpy_min_norm_qp(k):
    a, _, _ = normalize_gramian(random_gramian(k, 21, dims=3 * k))
    (native, converged), reference = min_norm_weights(a), mgda_cvxpy(a)
    assert converged
    assert abs(float(native.sum()) - 1) < 1e-9 and float(native.min()) >= 0
    # the objective is what is unique; compare it tightly, the weights loosely
    assert float(native @ a @ native) <= float(reference @ a @ reference) * (1 + 1e-7) + 1e-12
    assert torch.allclose(native, reference, atol=1e-4)


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("k", SIZES)
def test_cagrad_dual_matches_cvxpy_socp(k, c):
    a, _, _ = normalize_gramian(random_gramian(k, 31, dims=3 * k))
    (native, converged), reference = cagrad_dual_weights(a, c), cagrad_cvxpy(a, c)
    assert converged
    assert torch.allclose(native, reference, atol=1e-4)


CAGRAD_CASES = {  # task gradients as rows; all but the last have 0 in their hull (several optima)
    "exactly opposite, plus a third": [[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]],
    "exactly opposite pair": [[1.0, 2.0], [-1.0, -2.0]],
    "a zero task gradient": [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]],
    "rank deficient, 0 in the hull": [[1.0, 2.0, 0.0], [-2.0, -4.0, 0.0], [3.0, 6.0, 0.0], [0.5, 0.0, 1.0]],
    "a general position": [[1.0, 0.2, -0.3], [-0.5, 1.0, 0.1], [0.3, -0.4, 1.0]],
}


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("case", sorted(CAGRAD_CASES))
@pytest.mark.parametrize("path", ["cpu path", "gpu path"])
def test_cagrad_reaches_the_best_worst_task_improvement_of_its_problem(case, c, path):
    """Against an independent solve of CAGrad's primal problem (cvxpy, no dual): the direction
    stays in the ball and its worst task improvement is the optimum, also where the dual's
    formula is 0/0, and with no fallback."""
    g = torch.tensor(CAGRAD_CASES[case], dtype=torch.float64) * 3.0
    m = g @ g.T
    agg = make_aggregator("cagrad", c=c, rescale=0)
    with sync_free() if path == "gpu path" else contextlib.nullcontext():
        w = agg(m)
    _, best = cagrad_primal_cvxpy(m, c)
    mean = torch.full_like(w, 1 / len(w))
    scale = float(torch.diagonal(m).mean())
    assert float((m @ w).min()) >= best - 1e-6 * scale, f"worst improvement {float((m @ w).min())} < optimum {best}"
    assert float((w - mean) @ m @ (w - mean)) <= c**2 * float(mean @ m @ mean) * (1 + 1e-7) + 1e-12 * scale
    assert agg.fallbacks == 0


def test_cagrad_direction_is_conflict_averse():
    # CAGrad's defining property: within the ball around g0 it maximises the worst improvement.
    m = random_gramian(5, 41, dims=5)
    w = make_aggregator("cagrad", c=0.5, rescale=0)(m)
    mean = torch.full((5,), 0.2, dtype=m.dtype)
    d_minus_g0 = w - mean
    radius = 0.5 * torch.sqrt(mean @ m @ mean)
    assert math.isclose(float(torch.sqrt(d_minus_g0 @ m @ d_minus_g0)), float(radius), rel_tol=1e-6)
    worst = float((m @ w).min())
    assert worst >= float((m @ mean).min()) - 1e-9


# --- PCGrad --------------------------------------------------------------------------------
def _pcgrad_direct(grads: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad written on explicit gradient vectors, straight from the paper."""
    projected = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in order[i].tolist():
            if j == i:
                continue
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).mean(0)


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_pcgrad_matches_direct_implementation(k):
    gen = torch.Generator().manual_seed(k)
    grads = torch.randn(k, 4 * k, dtype=torch.float64, generator=gen)
    order = torch.argsort(torch.rand(k, k, generator=gen), dim=1)
    w = pcgrad_weights(grads @ grads.T, order)
    assert torch.allclose(w @ grads, _pcgrad_direct(grads, order), atol=1e-10)


def test_pcgrad_task_orders_are_the_argsort_of_the_callers_uniform_numbers():
    m = random_gramian(6, 5, dims=3)  # conflicts: the order matters
    agg = make_aggregator("pcgrad")
    state = agg.init_state(6)
    g = torch.Generator().manual_seed(0)
    u1, u2 = (torch.rand(6, 6, dtype=torch.float64, generator=g) for _ in range(2))
    w1, _ = agg.weigh(m, torch.zeros(6), state, u1)
    a, _, _ = normalize_gramian(m)
    assert torch.allclose(w1, pcgrad_weights(a, torch.argsort(u1, dim=1)), rtol=0, atol=1e-15)
    assert torch.equal(agg.weigh(m, torch.zeros(6), state, u1)[0], w1), "the same numbers give the same orders"
    assert not torch.allclose(agg.weigh(m, torch.zeros(6), state, u2)[0], w1)
    # the library call draws them from the object's own generator, saved with its state
    lib = make_aggregator("pcgrad")
    lib(m)
    saved = lib.state_dict()
    following = lib(m)
    restored = make_aggregator("pcgrad")
    restored.load_state_dict(saved)
    assert torch.equal(restored(m), following)


# --- torchjd, where the definitions agree --------------------------------------------------
def test_agrees_with_torchjd_where_definitions_match():
    tj = pytest.importorskip("torchjd.aggregation")
    m = random_gramian(6, 51, dims=12)
    a, _, _ = normalize_gramian(m)
    assert torch.allclose(make_aggregator("imtlg")(m), tj.IMTLGWeighting()(m), atol=1e-8)
    # torchjd's FairGrad solves the same condition with least squares
    assert torch.allclose(make_aggregator("fairgrad", alpha=2.0)(m), tj.FairGradWeighting(alpha=2.0)(m), rtol=1e-4)
    # torchjd's CAGrad does not rescale by 1 + c^2
    assert torch.allclose(make_aggregator("cagrad", c=0.4, rescale=0)(m), tj.CAGradWeighting(c=0.4)(m), atol=1e-4)
    # torchjd's MGDA is Frank-Wolfe with a stopping tolerance: agreement to its precision only
    assert torch.allclose(make_aggregator("mgda")(m), tj.MGDAWeighting(epsilon=1e-9, max_iters=10000)(m), atol=1e-3)
    # torchjd's PCGrad sums the projected gradients (we average) and draws orders from the
    # global torch RNG: replay its draws as our explicit orders
    torch.manual_seed(0)
    orders = torch.stack([torch.randperm(6) for _ in range(6)])
    torch.manual_seed(0)
    assert torch.allclose(pcgrad_weights(a, orders) * 6, tj.PCGradWeighting()(m), atol=1e-10)


# --- properties every method has ------------------------------------------------------------
def _fixed_order_pcgrad(perm):
    """PCGrad on a permuted problem must use the permuted order: a fixed-order wrapper."""
    gen = torch.Generator().manual_seed(0)
    order = torch.argsort(torch.rand(6, 6, generator=gen), dim=1)
    inverse = torch.argsort(perm)
    permuted_order = inverse[order[perm]]
    return order, permuted_order


@pytest.mark.parametrize("method", ALL_METHODS)
def test_permutation_equivariance(method):
    m = random_gramian(6, 61, spread=3.0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    if method == "pcgrad":
        order, permuted_order = _fixed_order_pcgrad(perm)
        a, _, _ = normalize_gramian(m)
        w = pcgrad_weights(a, order)
        w_perm = pcgrad_weights(a[perm][:, perm], permuted_order)
    else:
        w = aggregator(method)(m)
        w_perm = aggregator(method)(m[perm][:, perm])
    assert torch.allclose(w_perm, w[perm], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("scale", [1e-15, 1.0, 1e15])
def test_scale_extremes_give_finite_consistent_weights(method, scale):
    m = random_gramian(5, 71)
    agg = aggregator(method)
    w = agg(m * scale)
    assert torch.isfinite(w).all()
    assert agg.fallbacks == 0
    # the direction is the same whatever the scale: compare normalised directions
    w1 = aggregator(method)(m)
    d1, d = w1 / torch.sqrt(w1 @ m @ w1), w / torch.sqrt(w @ m @ w)
    assert torch.allclose(d, d1, rtol=1e-6)


DEGENERATE = {
    "zero task gradient": torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 0.0]]),
    "identical tasks": torch.ones(3, 3),
    "opposite tasks": torch.tensor([[1.0, -1.0], [-1.0, 1.0]]),
    "rank deficient": (lambda g: g @ g.T)(torch.randn(5, 2, generator=torch.Generator().manual_seed(0))),
    "all zero": torch.zeros(3, 3),
    "nan": torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]),
    "inf": torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_degenerate_gramians_give_finite_weights(method, case):
    m = DEGENERATE[case].double()
    agg = aggregator(method)
    w = agg(m)
    assert w.shape == (m.shape[0],)
    assert torch.isfinite(w).all(), f"{method} returned {w} for {case}"
    if case in ("nan", "inf"):
        assert agg.fallbacks == 1, "non-finite input must be counted as a fallback"
        assert torch.allclose(w, torch.full_like(w, 0.5))


def test_nashmtl_counts_a_fallback_when_no_solution_exists():
    agg = make_aggregator("nashmtl")
    agg(DEGENERATE["opposite tasks"].double())
    agg(DEGENERATE["identical tasks"].double())  # a solution exists here: not counted
    assert agg.fallbacks == 1


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_keep_dtype_and_device(method, dtype):
    m = random_gramian(4, 81).to(dtype)
    w = aggregator(method)(m, torch.ones(4, dtype=dtype))
    assert w.dtype == dtype and w.device == m.device and w.shape == (4,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_cuda_matches_cpu(method):
    m = random_gramian(10, 91)
    cpu = aggregator(method)(m)
    gpu = aggregator(method)(m.cuda())
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)


# --- errors ---------------------------------------------------------------------------------
def test_unknown_method_lists_choices():
    with pytest.raises(
        AggregatorError, match="unknown aggregation method 'nash'; choose one of: auxinash, cagrad, fairgrad"
    ):
        make_aggregator("nash")


def test_unknown_option_lists_valid_options():
    with pytest.raises(AggregatorError, match=r"unknown option.*alpha.*valid options: c, rescale"):
        make_aggregator("cagrad", alpha=1.0)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("fairgrad", {"alpha": 0}, "alpha must be a finite number > 0"),
        ("fairgrad", {"alpha": float("inf")}, "alpha must be a finite number > 0, got inf"),
        ("cagrad", {"c": -1}, "c must be a finite number >= 0"),
        ("cagrad", {"c": float("nan")}, "c must be a finite number >= 0, got nan"),
        (
            "cagrad",
            {"rescale": 5},
            r"unknown rescale \(0 none, 1 divide by 1\+c\^2, 2 by 1\+c\) 5; choose one of: 0, 1, 2",
        ),
        ("nashmtl", {"update_weights_every": 0}, "update_weights_every must be an integer >= 1"),
        ("nashmtl", {"solver": "ecos"}, "unknown solver 'ecos'; choose one of: newton, cvxpy"),
        ("nashmtl", {"max_norm": -1}, r"max_norm must be a finite number >= 0 \(0 disables it\)"),
        ("nashmtl", {"max_norm": float("nan")}, "max_norm must be a finite number >= 0"),
        ("nashmtl", {"powers": [1, -1]}, "each of powers must be a finite number > 0, got -1"),
        ("nashmtl", {"powers": []}, "powers must be a list of positive numbers"),
    ],
)
def test_bad_option_values_are_explained(method, options, message):
    with pytest.raises(AggregatorError, match=message):
        make_aggregator(method, **options)


def test_bad_shapes_are_explained():
    with pytest.raises(AggregatorError, match=r"square \[K, K\]"):
        make_aggregator("ls")(torch.ones(2, 3))
    with pytest.raises(AggregatorError, match=r"losses must have shape \[2\]"):
        make_aggregator("ls")(torch.eye(2), torch.ones(3))


def test_cvxpy_solver_without_conic_solver_is_a_clear_error(monkeypatch):
    import cvxpy

    monkeypatch.setattr(cvxpy, "installed_solvers", lambda: ["OSQP"])
    with pytest.raises(AggregatorError, match="pip install clarabel"):
        make_aggregator("nashmtl", solver="cvxpy")


def test_published_style_cvxpy_run_reaches_the_same_weights_to_its_tolerance():
    from rl_mtl.aggregators.reference import nash_cvxpy

    a, _, _ = normalize_gramian(random_gramian(5, 17))
    published = nash_cvxpy(a, published=True)
    native = make_aggregator("nashmtl", max_norm=0)(a)
    assert torch.allclose(published, native, rtol=1e-2)  # its stopping rule is |A alpha - 1/alpha| < 1e-3


# --- several seeds' aggregators at once (train --seeds) ----------------------------------------
SEED_CASES = [(m, {}) for m in ALL_METHODS] + [("nashmtl", {"update_weights_every": 2})]


@pytest.mark.parametrize("path", ["gpu path", "cpu path"])
@pytest.mark.parametrize(("method", "options"), SEED_CASES, ids=[f"{m}{o or ''}" for m, o in SEED_CASES])
def test_aggregating_seeds_together_equals_each_seed_alone(method, options, path):
    """Each seed keeps its own state (fallback count, reused weights) and random numbers, and gets
    the weights a call of its own gives, with one seed's Gramian degenerate and, in the third call
    (a solve, also for Nash-MTL's reuse every 2), another's not finite. The GPU path (one vmapped
    solve for all seeds) runs here under ``sync_free``."""
    seeds, k = 3, 5
    agg = aggregator(method, **options)
    alone = [agg.init_state(k) for _ in range(seeds)]
    together = {name: torch.stack([value] * seeds) for name, value in agg.init_state(k).items()}
    g = torch.Generator().manual_seed(1)
    for call in range(4):
        grams = torch.stack([random_gramian(k, 10 * call + s, spread=10.0) for s in range(seeds)])
        grams[0] = DEGENERATE["zero task gradient"].double()[[0, 1, 2, 2, 2]][:, [0, 1, 2, 2, 2]]
        if call == 2:
            grams[2, 0, 0] = float("nan")
        losses = torch.rand(seeds, k, dtype=grams.dtype, generator=g)
        uniform = torch.rand(seeds, k, k, dtype=torch.float64, generator=g)
        gram_in = grams if agg.uses_gramian else None
        expected = []
        for s in range(seeds):
            weights, alone[s] = agg.weigh(None if gram_in is None else grams[s], losses[s], alone[s], uniform[s])
            expected.append(weights)
        with sync_free() if path == "gpu path" else contextlib.nullcontext():
            got, together = aggregate(agg, gram_in, losses, together, uniform)
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-6, atol=1e-12, msg=f"call {call}")
    for s in range(seeds):
        for name, value in alone[s].items():
            torch.testing.assert_close(together[name][s], value, rtol=1e-6, atol=1e-12, msg=name)
    fallbacks = together["fallbacks"].tolist()
    assert fallbacks[0] >= (method in ("nashmtl", "fairgrad")), "the degenerate seed's fallbacks"
    assert fallbacks[2] >= (method != "ls") and fallbacks[1] == 0  # ls never looks at M


@pytest.mark.parametrize(
    ("options", "gpu_path", "solves"),
    [({}, True, 1), ({}, False, 3), ({"solver": "cvxpy"}, True, 3)],
    ids=["gpu path: one batched solve", "cpu path: one per seed", "host solver: one per seed"],
)
def test_seeds_share_one_batched_solve_on_the_gpu_path(monkeypatch, options, gpu_path, solves):
    agg = make_aggregator("nashmtl", **options)
    calls = []
    original = type(agg).bargain
    monkeypatch.setattr(type(agg), "bargain", lambda self, *args: calls.append(1) or original(self, *args))
    grams = torch.stack([random_gramian(4, s) for s in range(3)])
    state = {name: torch.stack([value] * 3) for name, value in agg.init_state(4).items()}
    with sync_free() if gpu_path else contextlib.nullcontext():
        aggregate(agg, grams, torch.ones(3, 4, dtype=grams.dtype), state, torch.rand(3, 4, 4, dtype=torch.float64))
    assert len(calls) == solves
