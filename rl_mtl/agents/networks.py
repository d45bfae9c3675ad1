"""Multi-task networks: the architecture protocol, the MLPs, and building a registered architecture.

A network is written for ONE task and takes its parameters explicitly:
``forward_one(shared, task, x)``, where ``shared`` holds the parameters every task's loss reaches
and ``task`` holds ONE task's slice of the per-task parameters (stacked [K, ...] in the agent's
state). The batched forward over [K, B, ...], the per-task gradients and the seed axis are all
``torch.func.vmap`` over that function, so an architecture is defined once and runs with every
aggregator (its shared parameters get the aggregated gradient, its per-task ones their own
task's), several seeds and a compiled update.

Adding an architecture: one module with a class that has

- ``__init__(obs_dim, extra_dim, out_dim, tasks, hidden_sizes, init, **options)``: ``x`` is
  [obs, extra] (extra: the action, for a critic; nothing for the policy), ``tasks`` the task names
  in order, ``init`` "default" (the architecture's published initialisation) or "xavier"; the
  keyword options are ``agent.architecture_options.<name>``, checked in ``__init__`` (raise
  ValueError saying what is wrong);
- ``init(generator) -> (shared, per_task)`` and ``forward_one(shared, task, x) -> out``;
- ``describe() -> dict``: what ``run.json`` should record beyond the options (or ``{}``);

and one line in ``rl_mtl.registry.ARCHITECTURES``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import ARCHITECTURES, component, construct
from .layers import Params, init_linear


class Network(Protocol):
    """What the SAC agent needs of a network (one for the actor, one per twin critic)."""

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        """Fresh parameters, drawn from ``generator`` on the CPU: (shared, per-task [K, ...])."""
        ...

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        """One task: x [..., obs_dim + extra_dim] -> [..., out_dim]."""
        ...

    def describe(self) -> dict[str, Any]: ...


class MLP:
    """ReLU MLP for K tasks. ``per_task``: "none" (all layers shared), "head" (the last layer per
    task: a multi-head network) or "all" (every layer per task: independent networks)."""

    per_task = "none"

    def __init__(self, obs_dim: int, extra_dim: int, out_dim: int, tasks: list[str], hidden_sizes: list[int],
                 init: str) -> None:  # fmt: skip
        self.dims = [obs_dim + extra_dim, *hidden_sizes, out_dim]
        self.num_tasks, self.init_scheme = len(tasks), init
        last = len(self.dims) - 2
        self.task_layers = {
            i for i in range(last + 1) if self.per_task == "all" or (self.per_task == "head" and i == last)
        }

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        shared: Params = {}
        task: Params = {}
        for layer, (d_in, d_out) in enumerate(zip(self.dims[:-1], self.dims[1:], strict=True)):
            stacked = layer in self.task_layers
            weight, bias = init_linear(d_out, d_in, self.init_scheme, generator, self.num_tasks if stacked else None)
            target = task if stacked else shared
            target[f"weight{layer}"], target[f"bias{layer}"] = weight, bias
        return shared, task

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        last = len(self.dims) - 2
        for layer in range(last + 1):
            src = task if layer in self.task_layers else shared
            x = F.linear(x, src[f"weight{layer}"], src[f"bias{layer}"])
            if layer < last:
                x = F.relu(x)
        return x

    def describe(self) -> dict[str, Any]:
        return {}


class MultiHeadMLP(MLP):
    per_task = "head"


class IndependentMLPs(MLP):
    per_task = "all"


def make_network(name: str, obs_dim: int, extra_dim: int, out_dim: int, tasks: list[str], hidden_sizes: list[int],
                 init: str, options: dict[str, Any]) -> Network:  # fmt: skip
    """Build a network of the registered architecture ``name``; unknown or bad options raise ValueError."""
    cls = component(ARCHITECTURES, name)
    return construct(cls, name, (obs_dim, extra_dim, out_dim, tasks, hidden_sizes, init), options, ValueError)
