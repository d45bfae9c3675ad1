"""AuxiNash: the hypergradient of the bargaining powers against finite differences of the objective
it estimates, its reduction to Nash-MTL, the powers' admissible set, learning which auxiliary task
helps on a toy problem, and its place in training (logged, resumed exactly)."""

import json
import math

import pytest
import torch
from conftest import random_gramian

from rl_mtl.aggregators import AggregatorError, make_aggregator
from rl_mtl.aggregators.auxinash import MainTaskSignal, main_task_alignment, power_gradient
from rl_mtl.config import ConfigError, load_config
from rl_mtl.gradients import task_gradients

D = torch.float64


# -- the hypergradient -----------------------------------------------------------------------------------
def _regression_tasks(k=3, n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(k, n, d, generator=g, dtype=D)
    ys = torch.randn(k, n, generator=g, dtype=D) + xs @ torch.randn(d, generator=g, dtype=D)
    val_x, val_y = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    return xs, ys, val_x, val_y


def _loss(shared, task, batch):
    x, y = batch
    return 0.5 * (x @ shared["theta"] - y).pow(2).mean()


def test_the_power_hypergradient_matches_finite_differences_of_its_objective():
    """On least squares the inner problem has a closed form: theta*(alpha) minimises
    sum_k alpha_k l_k, alpha(p) solves M alpha = p / alpha for a fixed Gramian M, and the
    objective is the main task's held-out loss F(p) = l_V(theta*(alpha(p))) (Eq. 4-6). Its
    gradient by central differences must equal the one AuxiNash steps on (scaled by the series'
    step: the series sums to H^-1 / eta), to 1e-6 relative."""
    xs, ys, val_x, val_y = _regression_tasks()
    k, main = len(xs), 0
    m = random_gramian(k, 5)  # the Gramian the bargaining uses, fixed as in Prop. 4.2
    nash = make_aggregator("nashmtl", max_norm=0)

    def alpha_of(p):
        return nash.bargain(m, p)[0]

    def theta_of(alpha):
        h = sum(a * x.T @ x / len(x) for a, x in zip(alpha, xs, strict=True))
        b = sum(a * x.T @ y / len(x) for a, x, y in zip(alpha, xs, ys, strict=True))
        return torch.linalg.solve(h, b)

    def objective(p):
        return _loss({"theta": theta_of(alpha_of(p))}, {}, (val_x, val_y))

    p = torch.tensor([1.3, 0.6, 1.1], dtype=D)
    step = 1e-6
    finite_differences = torch.stack([(objective(p + step * e) - objective(p - step * e)) / (2 * step)
                                      for e in torch.eye(k, dtype=D)])  # fmt: skip

    alpha = alpha_of(p)
    theta = {"theta": theta_of(alpha)}
    grads = task_gradients(_loss, theta, {}, (xs, ys))
    eta, terms = 0.3, 400  # the Hessian's eigenvalues lie in (0, 1/eta): the series converges
    alignment = main_task_alignment(_loss, theta, {}, (xs, ys), alpha, (xs * 0 + val_x, ys * 0 + val_y),
                                    grads.shared, MainTaskSignal(main, terms, eta))  # fmt: skip
    hypergradient = -eta * power_gradient(m, alpha, p, alignment)
    torch.testing.assert_close(hypergradient, finite_differences, rtol=1e-6, atol=1e-9)


def test_the_bargaining_jacobian_is_the_implicit_derivative():
    """Prop. 4.2: d alpha / dp = (M + diag(p / alpha^2))^-1 diag(1/alpha); checked column by
    column against differences of the solve, and J p = alpha / 2 (alpha(c p) = sqrt(c) alpha(p))."""
    m, p = random_gramian(4, 9), torch.tensor([0.5, 1.0, 2.0, 0.8], dtype=D)
    nash = make_aggregator("nashmtl", max_norm=0)
    alpha = nash.bargain(m, p)[0]
    jacobian = torch.stack([power_gradient(m, alpha, p, e) for e in torch.eye(4, dtype=D)])  # J^T e_i: J's rows
    for j, e in enumerate(torch.eye(4, dtype=D)):
        column = (nash.bargain(m, p + 1e-6 * e)[0] - nash.bargain(m, p - 1e-6 * e)[0]) / 2e-6  # d alpha / d p_j
        torch.testing.assert_close(jacobian[:, j], column, rtol=1e-6, atol=1e-9, msg=f"column {j}")
    torch.testing.assert_close(jacobian @ p, alpha / 2)


# -- Nash-MTL, admissible powers -----------------------------------------------------------------------------
def test_equal_powers_without_learning_give_nashmtl_s_weights_exactly():
    for options in ({}, {"update_weights_every": 3, "max_norm": 0.5}):
        aux = make_aggregator("auxinash", main_task="b", **options)
        aux.bind_tasks(["a", "b", "c", "d", "e"])
        nash = make_aggregator("nashmtl", **options)
        for call in range(5):
            m = random_gramian(5, call, spread=10.0)
            assert torch.equal(aux(m), nash(m)), f"call {call}"


def test_the_powers_stay_positive_and_summing_to_k():
    """p is floored at min_power, then renormalised to sum K (the authors' projection): every
    power stays positive and finite, whatever the signal's scale."""
    aux = make_aggregator("auxinash", main_task="a", powers_lr=0.5, min_power=1e-3)
    state = aux.init_state(4)
    g = torch.Generator().manual_seed(0)
    for call in range(200):
        m = random_gramian(4, call)
        _, state = aux.weigh(m, torch.zeros(4, dtype=D), state, torch.rand(4, 4, dtype=D))
        state = aux.learn_powers(m, state, torch.randn(4, generator=g, dtype=D) * 10.0 ** (call % 7))
        assert torch.isfinite(state["powers"]).all() and (state["powers"] > 0).all()
        assert math.isclose(float(state["powers"].sum()), 4.0, rel_tol=1e-12)
    before = state["powers"].clone()
    state = aux.learn_powers(m, state, torch.tensor([float("nan"), 1.0, 0.0, 0.0], dtype=D))
    assert torch.equal(state["powers"], before), "a non-finite signal (a skipped update) must not move p"
    assert float(before.max() / before.min()) > 10, "the powers did not move"


def test_a_useful_auxiliary_task_gains_power_over_an_adversarial_one():
    """A shared trunk learns a main regression task from few noisy samples, with an auxiliary task
    that has the same target and little noise (useful) and one with another target (adversarial):
    AuxiNash's learned power ends higher for the useful one (Shamsian et al., section 6.1)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    d, hidden, n = 6, 16, 32
    true = torch.randn(d, generator=g, dtype=D)
    other = torch.randn(d, generator=g, dtype=D)

    def sample(target, noise, size):
        x = torch.randn(size, d, generator=g, dtype=D)
        return x, torch.tanh(x @ target) + noise * torch.randn(size, generator=g, dtype=D)

    trunk = {"w": 0.3 * torch.randn(hidden, d, generator=g, dtype=D)}
    heads = {"v": 0.3 * torch.randn(3, hidden, generator=g, dtype=D)}

    def loss(shared, task, batch):
        x, y = batch
        return (torch.tanh(x @ shared["w"].T) @ task["v"] - y).pow(2).mean()

    aux = make_aggregator("auxinash", main_task="main", update_powers_every=1, powers_lr=0.05, neumann_terms=0)
    aux.bind_tasks(["main", "useful", "adversarial"])
    state = aux.init_state(3)
    main_train = sample(true, 1.0, 2000)  # the main task's data: plentiful but very noisy

    for _ in range(300):
        idx = torch.randint(2000, (n,), generator=g)
        batches = [(main_train[0][idx], main_train[1][idx]), sample(true, 0.05, n), sample(other, 0.05, n)]
        xs, ys = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        grads = task_gradients(loss, trunk, heads, (xs, ys))
        weights, state = aux.weigh(grads.gramian(), grads.losses, state, torch.rand(3, 3, dtype=D))
        held_out = sample(true, 0.05, n)  # the main task on held-out inputs
        val = (torch.stack([held_out[0]] * 3), torch.stack([held_out[1]] * 3))
        alignment = main_task_alignment(loss, trunk, heads, (xs, ys), weights, val, grads.shared,
                                        MainTaskSignal(0, 0, 0.0))  # fmt: skip
        state = aux.learn_powers(grads.gramian(), state, alignment)
        trunk = {"w": trunk["w"] - 0.2 * grads.combine(weights)["w"]}
        heads = {"v": heads["v"] - 0.2 * grads.task_specific["v"]}
    useful, adversarial = float(state["powers"][1]), float(state["powers"][2])
    assert useful > adversarial, f"useful {useful:.3f} <= adversarial {adversarial:.3f}"


# -- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "main_task is required"),
        ({"main_task": "a", "powers_lr": -1}, "powers_lr must be a finite number >= 0"),
        ({"main_task": "a", "powers_momentum": 1.0}, "powers_momentum must be below 1"),
        ({"main_task": "a", "neumann_terms": 1.5}, "neumann_terms must be an integer >= 0"),
        ({"main_task": "a", "update_powers_every": 0}, "update_powers_every must be an integer >= 1"),
        ({"main_task": "a", "min_power": 0}, "min_power must be a finite number > 0"),
        ({"main_task": "a", "initial_powers": [1, -1]}, "each of powers must be a finite number > 0"),
    ],
)
def test_bad_options_are_explained(options, message):
    with pytest.raises(AggregatorError, match=message):
        make_aggregator("auxinash", **options)


def test_the_main_task_must_be_one_of_the_run_s_tasks():
    with pytest.raises(ConfigError, match="main_task is required"):
        load_config("smoke", method="auxinash")
    aux = make_aggregator("auxinash", main_task="reach-v2")
    with pytest.raises(AggregatorError, match="'reach-v2' is not one of this run's tasks; choose one of: reach-v3"):
        aux.bind_tasks(["reach-v3", "push-v3"])


# -- training ----------------------------------------------------------------------------------------------------
TINY = ["env.benchmark=custom", "env.tasks=[reach-v3, window-close-v3]", "env.max_episode_steps=20",
        "train.total_steps=80", "train.warmup_steps=20", "train.eval_every=0", "train.eval_episodes=1",
        "train.checkpoint_every=40", "train.log_every=20", "method_options.auxinash.main_task=window-close-v3",
        "method_options.auxinash.update_powers_every=4", "method_options.auxinash.powers_lr=0.1"]  # fmt: skip


@pytest.mark.slow
def test_a_run_logs_its_learned_powers_and_resumes_them_exactly(tmp_path):
    from rl_mtl.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from rl_mtl.metrics import read_metrics
    from rl_mtl.train import EXIT_INTERRUPTED, run

    cfg = load_config("smoke", TINY, method="auxinash")
    assert run([(cfg, tmp_path / "straight", None)], progress=False) == 0
    records, _ = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    last = [r for r in records if r["kind"] == "train"][-1]
    for network in ("critic", "actor"):
        powers = [last[f"auxinash/power/{network}/{t}"] for t in ("reach-v3", "window-close-v3")]
        assert math.isclose(sum(powers), 2.0, rel_tol=1e-9) and powers != [1.0, 1.0], (network, powers)
    assert run([(cfg, tmp_path / "killed", None)], progress=False, stop_at_step=60) == EXIT_INTERRUPTED
    state = load_checkpoint(tmp_path / "killed" / CHECKPOINT_NAME)
    assert state["step"] == 40 and not torch.equal(
        state["agent"]["aggregators"]["critic"]["powers"], torch.ones(2, dtype=D)
    )
    assert run([(cfg, tmp_path / "killed", state)], progress=False) == 0

    def comparable(d):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(d / "metrics.jsonl")[0]]

    assert comparable(tmp_path / "killed") == comparable(tmp_path / "straight")
    assert json.loads((tmp_path / "straight" / "run.json").read_text())["method"] == "auxinash"
