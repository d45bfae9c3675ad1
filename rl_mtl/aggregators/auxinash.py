"""AuxiNash (Shamsian, Navon, Glazer, Kawaguchi, Chechik, Fetaya, ICML 2023): the asymmetric Nash
bargaining solution, with the bargaining powers learned so that the other tasks help one main task.

The update is Nash-MTL's with powers p: alpha > 0 with M alpha = p / alpha (Claim 4.1), solved by
the same damped Newton method. Every ``update_powers_every`` updates p takes a step down the
hypergradient of the main task's loss on held-out data with respect to p (Eq. 6; ``learn``, the
hook of ``base.Aggregator``, which gives it a held-out batch every ``update_powers_every`` updates):

    dL_V/dp = - diag(1/alpha) (M + diag(p / alpha^2))^-1 G s,

where the K x K factor is the implicit derivative of the bargaining condition (Prop. 4.2) and
G s = [g_k . s]_k (``alignment``) comes from the learner: g_k task k's training gradient and
s = sum_{j=0}^{J} (I - eta H)^j g_V the main task's held-out gradient g_V through J terms of a
Neumann series for the inverse Hessian H of the alpha-weighted training loss (Eq. 4; the
authors' code, which like this one leaves out the series' factor eta). The step follows their
code: the hypergradient clipped to norm 1, SGD with momentum, then p floored at ``min_power`` and
renormalised to sum K (p = 1 for every task, the start, is Nash-MTL).

State: Nash-MTL's (``powers`` is learned here) and ``momentum``, the SGD momentum of p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .base import AggregatorError, Objective, Params, State, check_option
from .nashmtl import NashMTL


class AuxiNash(NashMTL):
    """Options (defaults from the authors' code and the paper's appendix D):
    main_task: the task the others should help (required; one of the run's task names).
    update_powers_every: updates between two steps of p (25).
    powers_lr, powers_momentum: SGD on p (5e-3, 0.9).
    neumann_terms, neumann_step: the inverse-Hessian series (3 terms after the first, 1e-4);
      0 terms is the identity approximation (s = g_V).
    min_power: the floor of p before it is renormalised to sum K (1e-4).
    initial_powers: p at the start (default all ones: Nash-MTL), renormalised to sum K.
    max_norm, update_weights_every: as for Nash-MTL (1.0 and 1).
    """

    name = "auxinash"
    needs_held_out = True  # the main task's gradient on held-out data
    logged_state: ClassVar[dict[str, str]] = {"powers": "power"}

    def __init__(
        self,
        main_task: str | None = None,
        update_powers_every: int = 25,
        powers_lr: float = 5e-3,
        powers_momentum: float = 0.9,
        neumann_terms: int = 3,
        neumann_step: float = 1e-4,
        min_power: float = 1e-4,
        initial_powers: list[float] | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
    ) -> None:
        super().__init__(update_weights_every=update_weights_every, max_norm=max_norm, powers=initial_powers)
        if not isinstance(main_task, str) or not main_task:
            raise AggregatorError(
                "auxinash: main_task is required: the task the other tasks should help, e.g. "
                "--set method_options.auxinash.main_task=reach-v3"
            )
        check_option(self.name, "update_powers_every", update_powers_every, 1, integer=True)
        check_option(self.name, "powers_lr", powers_lr, 0)
        check_option(self.name, "powers_momentum", powers_momentum, 0)
        check_option(self.name, "neumann_terms", neumann_terms, 0, integer=True)
        check_option(self.name, "neumann_step", neumann_step, 0)
        check_option(self.name, "min_power", min_power, 0, strict=True)
        if powers_momentum >= 1:
            raise AggregatorError(f"auxinash: powers_momentum must be below 1, got {powers_momentum!r}")
        self.main_task, self.update_powers_every = main_task, update_powers_every
        self.learn_every = update_powers_every
        self.powers_lr, self.powers_momentum = float(powers_lr), float(powers_momentum)
        self.neumann_terms, self.neumann_step, self.min_power = neumann_terms, float(neumann_step), float(min_power)
        self.main_index: int | None = None

    def options(self) -> dict[str, Any]:
        return {
            "main_task": self.main_task, "update_powers_every": self.update_powers_every,
            "powers_lr": self.powers_lr, "powers_momentum": self.powers_momentum,
            "neumann_terms": self.neumann_terms, "neumann_step": self.neumann_step, "min_power": self.min_power,
            "initial_powers": self.powers, "max_norm": self.max_norm,
            "update_weights_every": self.update_weights_every,
        }  # fmt: skip

    def bind_tasks(self, tasks: list[str]) -> None:
        if self.main_task not in tasks:
            raise AggregatorError(
                f"auxinash: main_task {self.main_task!r} is not one of this run's tasks; choose one of: "
                f"{', '.join(tasks)}"
            )
        self.main_index = tasks.index(self.main_task)

    def init_state(self, k: int, device: torch.device | str = "cpu") -> State:
        state = super().init_state(k, device)
        powers = state["powers"]
        return {**state, "powers": powers * k / powers.sum(), "momentum": torch.zeros_like(powers)}

    def learn(self, state: State, objective: Objective) -> State:
        """A step of p on this update: the alignment of the training gradients with the main task's
        held-out gradient (``main_task_alignment``, at the parameters the gradients were taken at)."""
        assert self.main_index is not None, "bind_tasks first: the main task is named, not numbered"
        signal = MainTaskSignal(self.main_index, self.neumann_terms, self.neumann_step)
        params = objective.params
        alignment = main_task_alignment(objective.task_loss, params["shared"], params["task"], objective.batch,
                                        objective.weights, objective.held_out, objective.gradients, signal)  # fmt: skip
        return self.learn_powers(objective.gramian, state, alignment)

    def learn_powers(self, gramian: Tensor, state: State, alignment: Tensor) -> State:
        """One step of p from this update's Gramian, the last solve's alpha and the alignment G s
        [K]; p stays as it is where any of them is not finite or alpha not > 0 (a seed whose critic step
        was skipped but whose actor gradients are finite still steps its actor's powers)."""
        m, alpha, p = gramian.detach().to(torch.float64), state["alpha"], state["powers"]
        grad = -power_gradient(m, alpha, p, alignment.to(torch.float64))
        ok = torch.isfinite(grad).all() & (alpha > 0).all()
        grad = torch.where(ok, grad, 0.0)
        grad = grad * torch.clamp(1.0 / torch.linalg.vector_norm(grad).clamp(min=1e-300), max=1.0)  # norm <= 1
        momentum = self.powers_momentum * state["momentum"] + grad
        stepped = torch.clamp(p - self.powers_lr * momentum, min=self.min_power)
        stepped = stepped * p.shape[-1] / stepped.sum()
        return {
            **state,
            "powers": torch.where(ok, stepped, p),
            "momentum": torch.where(ok, momentum, state["momentum"]),
        }


def power_gradient(gramian: Tensor, alpha: Tensor, powers: Tensor, alignment: Tensor) -> Tensor:
    """diag(1/alpha) (M + diag(p / alpha^2))^-1 G s: minus the hypergradient dL_V/dp (Eq. 6),
    i.e. J^T (G s) with J = d alpha / dp = (M + diag(p / alpha^2))^-1 diag(1/alpha) (Prop. 4.2)."""
    system = gramian + torch.diag(powers / alpha.square())
    return torch.linalg.solve_ex(system, alignment)[0] / alpha


@dataclass(frozen=True)
class MainTaskSignal:
    """Where the powers' signal comes from: the main task's index, and the inverse-Hessian
    series' length and step."""

    main: int
    neumann_terms: int
    neumann_step: float


def main_task_alignment(task_loss, shared: Params, task_specific: Params, batch: Any, weights: Tensor,
                        held_out: Any, shared_grads: Params, signal: MainTaskSignal) -> Tensor:  # fmt: skip
    """[K]: g_k . s for every task k, where g_k is task k's gradient over the shared parameters
    on ``batch`` (``shared_grads``, from the per-task pass) and s = sum_{j=0}^{J} (I - eta H)^j g_V,
    g_V the main task's gradient on ``held_out`` (every task's slice is given, the main task's is
    used) and H the Hessian of the weighted training loss sum_k w_k l_k over the shared
    parameters: Hessian-vector products, J = ``signal.neumann_terms``, eta its step.
    ``task_loss(shared, task, task_batch)``: one task's loss."""
    main = signal.main
    shared = {name: p.detach() for name, p in shared.items()}
    task_specific = {name: p.detach() for name, p in task_specific.items()}
    task_main = {name: p[main] for name, p in task_specific.items()}
    g_v = grad(task_loss)(shared, task_main, tree_map(lambda x: x[main], held_out))

    def training_loss(params: Params) -> Tensor:
        return (weights * vmap(task_loss, in_dims=(None, 0, 0))(params, task_specific, batch)).sum()

    s = v = g_v
    for _ in range(signal.neumann_terms):
        hessian_v = grad(lambda p, v=v: _dot(grad(training_loss)(p), v))(shared)
        v = {name: v[name] - signal.neumann_step * hessian_v[name] for name in v}
        s = {name: s[name] + v[name] for name in s}
    return torch.stack([(shared_grads[name] * s[name]).flatten(1).sum(1) for name in s]).sum(0)


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[name] * b[name]).sum() for name in a)
