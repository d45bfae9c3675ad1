"""Benchmarks that print numbers (never assertions): ``python -m rl_mtl.bench {aggregators,train}``.

Timings are medians over interleaved rounds (every variant is timed once per round, so a
noisy neighbour slows all of them alike) and ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import itertools
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..aggregators import AGGREGATORS, aggregate, make_aggregator
from ..aggregators.base import normalize_gramian
from ..aggregators.cagrad import cagrad_dual_weights
from ..aggregators.mgda import min_norm_weights
from ..aggregators.reference import cagrad_cvxpy, cagrad_slsqp, mgda_cvxpy, mgda_frank_wolfe, nash_cvxpy
from ..aggregators.solvers import sync_free
from ..gradients import task_gradients, task_gradients_loop
from ..runtime import resolve_device
from .timing import count_kernels, time_interleaved


def _gramian(k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, 2 * k, dtype=torch.float64, generator=gen)
    return (grads @ grads.T).to(device=device, dtype=torch.float32)


def solving_methods() -> list[str]:
    """The registered methods with a solve of their own: all but those that extend another
    registered one (AuxiNash: Nash-MTL's solve, with the powers learned on top)."""
    return [name for name, cls in AGGREGATORS.items()
            if not any(cls is not other and issubclass(cls, other) for other in AGGREGATORS.values())]  # fmt: skip


def gramian_methods() -> list[str]:
    """Those of them whose weights depend on the Gramian (not ``ls``)."""
    return [name for name in solving_methods() if AGGREGATORS[name].uses_gramian]


def bench_weights(device: torch.device, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    methods = solving_methods()
    rows = []
    for k in sizes:
        m = _gramian(k, device)
        aggs = {name: make_aggregator(name) for name in methods}
        aggs["nashmtl (cvxpy)"] = make_aggregator("nashmtl", solver="cvxpy")
        a_norm = normalize_gramian(m.double())[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fns = {n: (lambda a=a, m=m: a(m)) for n, a in aggs.items()}
            # The reference code's own way: log constraints, start at 1, its stopping rule.
            fns["nashmtl (published)"] = lambda a_norm=a_norm: nash_cvxpy(a_norm, published=True)
            times = time_interleaved(fns, device, rounds)
            # the agreement is measured in float64, where both solvers work
            m64 = m.double()
            native, reference = aggs["nashmtl"](m64), aggs["nashmtl (cvxpy)"](m64)
        rel = float(((native - reference).abs() / reference.abs()).max())
        rows.append(
            {
                "K": k,
                "ms": {n: t * 1e3 for n, t in times.items()},
                "nashmtl_cvxpy_over_newton": times["nashmtl (cvxpy)"] / times["nashmtl"],
                "nashmtl_published_over_newton": times["nashmtl (published)"] / times["nashmtl"],
                "nashmtl_max_rel_diff": rel,
            }
        )
    return rows


def _conflicting_gramian(k: int, seed: int = 0) -> torch.Tensor:
    """float64 Gramian of K task gradients (dimension 4K) sharing a common part, norms spread 10x,
    a few of them turned against the rest: the kind of conflict the aggregators exist for."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, 4 * k, dtype=torch.float64, generator=gen)
    grads = grads + 1.5 * torch.randn(4 * k, dtype=torch.float64, generator=gen)
    grads[: max(k // 4, 1)] *= -0.5
    grads *= torch.logspace(-0.5, 0.5, k, dtype=torch.float64)[:, None]
    return grads @ grads.T


SIMPLEX_C = 0.4  # CAGrad's c (its default)


def _simplex_problems(a: torch.Tensor, device: torch.device) -> dict[str, tuple[dict[str, Any], Any]]:
    """For MGDA and CAGrad's dual on the normalised Gramian ``a``: the solvers (name -> call) and
    the objective they minimise."""
    k = a.shape[0]
    a_dev = a.to(device)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    linear = a @ mean
    radius = SIMPLEX_C * torch.sqrt(mean @ linear)
    return {
        "mgda": ({"native (active set)": lambda: min_norm_weights(a_dev)[0],
                  "Frank-Wolfe (torchjd's, MGDA-UB)": lambda: mgda_frank_wolfe(a),
                  "cvxpy": lambda: mgda_cvxpy(a)},
                 lambda w: 0.5 * w @ a @ w),
        "cagrad": ({"native (active set)": lambda: cagrad_dual_weights(a_dev, SIMPLEX_C)[0],
                    "SLSQP (the authors' code)": lambda: cagrad_slsqp(a, SIMPLEX_C),
                    "cvxpy": lambda: cagrad_cvxpy(a, SIMPLEX_C)},
                   lambda w: w @ linear + radius * torch.sqrt(w @ a @ w)),
    }  # fmt: skip


def bench_simplex_solvers(device: torch.device, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    """MGDA's and CAGrad's solves against reference solvers of the same problems: time and the
    objective reached (its excess over the best of the solvers; the references run on the host)."""
    rows = []
    for k in sizes:
        problems = _simplex_problems(normalize_gramian(_conflicting_gramian(k))[0], device)
        for problem, (solvers, objective) in problems.items():
            times = time_interleaved(solvers, device, rounds)
            values = {name: float(objective(solve().cpu().double())) for name, solve in solvers.items()}
            best = min(values.values())
            for name in solvers:
                rows.append({"K": k, "problem": problem, "solver": name, "ms": times[name] * 1e3,
                             "objective": values[name], "excess": values[name] - best})  # fmt: skip
    return rows


def bench_seed_aggregation(device: torch.device, rounds: int, seeds: int = 10, k: int = 10) -> list[dict[str, Any]]:
    """``train --seeds``: the seeds' aggregators one call each vs ``aggregate`` (one vmapped
    solve), on the GPU path (no host reads, whole iteration budget) on any device, plus the CPU
    path's per-seed calls (each stops once converged) where the device is the CPU."""
    grams = torch.stack([_gramian(k, device, seed=s) for s in range(seeds)])
    losses = torch.ones(seeds, k, device=device)
    uniform = torch.rand(seeds, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for method in gramian_methods():
        agg = make_aggregator(method)
        state = {name: torch.stack([value] * seeds) for name, value in agg.init_state(k, device).items()}

        def per_seed(agg=agg, state=state):
            return [agg.weigh(grams[s], losses[s], {n: v[s] for n, v in state.items()}, uniform[s])
                    for s in range(seeds)]  # fmt: skip

        def together(agg=agg, state=state):
            return aggregate(agg, grams, losses, state, uniform)

        with sync_free():
            kernels = {"per seed": count_kernels(per_seed), "together": count_kernels(together)}
            times = time_interleaved({"per seed": per_seed, "together": together}, device, rounds)
        if device.type == "cpu":
            times["cpu path"] = time_interleaved({"cpu": together}, device, rounds)["cpu"]
        rows.append({
            "method": method, "seeds": seeds, "K": k, "kernels": kernels, "ms": {n: t * 1e3 for n, t in times.items()},
            "kernels_together_over_per_seed": kernels["together"] / kernels["per seed"],
        })  # fmt: skip
    return rows


def sac_sized_critic(obs_dim: int = 49, action_dim: int = 4, hidden: int = 400, layers: int = 3) -> nn.Module:
    dims = [obs_dim + action_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        mods += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, 1))


def bench_task_gradients(device: torch.device, rounds: int, k: int = 10, per_task: int = 128) -> dict[str, Any]:
    torch.manual_seed(0)
    net = sac_sized_critic().to(device)
    shared = dict(net.named_parameters())
    inputs = torch.randn(k, per_task, 53, device=device)
    targets = torch.randn(k, per_task, device=device)

    def task_loss(params, _task, batch):
        x, y = batch
        return ((functional_call(net, params, (x,)).squeeze(-1) - y) ** 2).mean()

    def batched():
        grads = task_gradients(task_loss, shared, {}, (inputs, targets))
        grads.gramian()

    def separate():
        task_gradients_loop(task_loss, shared, {}, (inputs, targets))

    def mean_loss():
        net.zero_grad(set_to_none=True)
        ((net(inputs).squeeze(-1) - targets) ** 2).mean().backward()

    times = time_interleaved({"vmap": batched, "separate": separate, "mean": mean_loss}, device, rounds)
    return {
        "K": k,
        "samples_per_task": per_task,
        "ms": {n: t * 1e3 for n, t in times.items()},
        "vmap_over_mean": times["vmap"] / times["mean"],
        "separate_over_mean": times["separate"] / times["mean"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="few rounds and sizes (CI smoke)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    rounds = 5 if args.quick else args.rounds
    sizes = [2, 10] if args.quick else [2, 10, 50]
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  rounds {rounds}")
    weights = bench_weights(device, sizes, rounds)
    methods = list(weights[0]["ms"])
    print("\nTime to turn a K x K Gramian into weights (ms, median):")
    print(f"{'K':>4} " + " ".join(f"{m:>15}" for m in methods))
    for row in weights:
        print(f"{row['K']:>4} " + " ".join(f"{row['ms'][m]:>15.3f}" for m in methods))
    print("\nNash-MTL: native Newton vs the cvxpy sequence of convex problems (ours: SOC form, good start;")
    print("published: the reference code's log form, start at 1 and stopping rule):")
    for row in weights:
        print(
            f"  K={row['K']:<3} cvxpy/newton time = {row['nashmtl_cvxpy_over_newton']:7.1f}x   "
            f"published/newton = {row['nashmtl_published_over_newton']:7.1f}x   "
            f"max relative weight difference (newton vs cvxpy) = {row['nashmtl_max_rel_diff']:.2e}"
        )
    simplex = bench_simplex_solvers(device, sizes, rounds)
    print(
        f"\nMGDA's and CAGrad's (c={SIMPLEX_C}) solves vs reference solvers of the same problems (conflicting "
        "task gradients, norms spread 10x; excess: objective above the best of the three; references on the host):"
    )
    print(f"  {'K':>3} {'problem':<8} {'solver':<34} {'ms':>9} {'objective excess':>17}")
    for row in simplex:
        print(f"  {row['K']:>3} {row['problem']:<8} {row['solver']:<34} {row['ms']:>9.3f} {row['excess']:>17.2e}")
    seeds = bench_seed_aggregation(device, rounds)
    print(
        f"\n{seeds[0]['seeds']} seeds' aggregators (train --seeds), K={seeds[0]['K']}, on the GPU path (no host "
        "reads): one call per seed vs one vmapped solve (aggregate); kernels = ATen operations "
        "dispatched (views excluded), one launch each on a GPU; times (ms, median) on this device"
        + ("; 'cpu path' = what the CPU runs (per-seed calls that stop once converged)" if device.type == "cpu" else "")
    )
    print(f"  {'':<10} {'kernels':>27} {'':>7} {'ms':>22}")
    per_seed = "a call per seed"
    print(f"  {'method':<10} {per_seed:>16} {'together':>10} {'ratio':>7} {per_seed:>16} {'together':>9}"
          + (f" {'cpu path':>9}" if device.type == "cpu" else ""))  # fmt: skip
    for row in seeds:
        ms, kernels = row["ms"], row["kernels"]
        print(
            f"  {row['method']:<10} {kernels['per seed']:>16} {kernels['together']:>10} "
            f"{row['kernels_together_over_per_seed']:>6.2f}x {ms['per seed']:>16.2f} {ms['together']:>9.2f}"
            + (f" {ms['cpu path']:>9.2f}" if "cpu path" in ms else "")
        )
    grads = bench_task_gradients(device, rounds)
    print(
        f"\nPer-task gradients, SAC-sized critic (3 x 400, obs 49 + action 4), K={grads['K']}, "
        f"{grads['samples_per_task']} samples per task (ms, median):"
    )
    for name, label in [
        ("vmap", "vmapped per-task gradients + Gramian"),
        ("separate", "K separate backward passes"),
        ("mean", "one mean-loss backward"),
    ]:
        print(f"  {label:40s} {grads['ms'][name]:9.2f}")
    print(
        f"  vmapped / mean-loss = {grads['vmap_over_mean']:.2f}x   "
        f"separate / mean-loss = {grads['separate_over_mean']:.2f}x"
    )
    return {
        "device": str(device), "torch": torch.__version__, "weights": weights, "simplex_solvers": simplex,
        "seed_aggregation": seeds,
        "task_gradients": grads,
    }  # fmt: skip
