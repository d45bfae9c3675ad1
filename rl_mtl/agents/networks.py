"""Multi-task networks: the architecture protocol, its registry, and the MLP family.

A network is written for ONE task and takes its parameters explicitly:
``forward_one(shared, task, x)``, where ``shared`` holds the parameters every task's loss reaches
and ``task`` holds ONE task's slice of the per-task parameters (stacked [K, ...] in the agent's
state). The batched forward over [K, B, ...], the per-task gradients and the seed axis are all
``torch.func.vmap`` over that function, so an architecture is defined once and runs with every
aggregator, several seeds and a compiled update.

Adding an architecture is one module with a class meeting ``Network`` plus one entry in
``ARCHITECTURES``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ..config import AgentConfig

Params = dict[str, Tensor]


class Network(Protocol):
    """What the SAC agent needs of a network (one for the actor, one per twin critic)."""

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        """Fresh parameters, drawn from ``generator`` on the CPU: (shared, per-task [K, ...])."""
        ...

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        """One task: x [..., in_dim] -> [..., out_dim]."""
        ...


def init_linear(out_dim: int, in_dim: int, scheme: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One [out, in] layer: PyTorch's nn.Linear default, or Xavier-uniform weights and zero biases."""
    weight, bias = torch.empty(out_dim, in_dim), torch.empty(out_dim)
    if scheme == "xavier":
        bound = math.sqrt(6.0 / (in_dim + out_dim))
        weight.uniform_(-bound, bound, generator=generator)
        bias.zero_()
    else:  # kaiming_uniform(a=sqrt(5)), as nn.Linear: both bounds are 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(in_dim)
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)
    return weight, bias


class MLP:
    """ReLU MLP for K tasks. ``per_task``: "none" (all layers shared), "head" (the last layer per
    task: a multi-head network) or "all" (every layer per task: independent networks)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_sizes: list[int], num_tasks: int, per_task: str,
                 init: str) -> None:  # fmt: skip
        self.dims = [in_dim, *hidden_sizes, out_dim]
        self.num_tasks, self.init_scheme = num_tasks, init
        last = len(self.dims) - 2
        self.task_layers = {i for i in range(last + 1) if per_task == "all" or (per_task == "head" and i == last)}

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        shared: Params = {}
        task: Params = {}
        for layer, (d_in, d_out) in enumerate(zip(self.dims[:-1], self.dims[1:], strict=True)):
            copies = self.num_tasks if layer in self.task_layers else 1
            drawn = [init_linear(d_out, d_in, self.init_scheme, generator) for _ in range(copies)]
            weight, bias = torch.stack([w for w, _ in drawn]), torch.stack([b for _, b in drawn])
            if layer in self.task_layers:
                task[f"weight{layer}"], task[f"bias{layer}"] = weight, bias
            else:
                shared[f"weight{layer}"], shared[f"bias{layer}"] = weight[0], bias[0]
        return shared, task

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        last = len(self.dims) - 2
        for layer in range(last + 1):
            src = task if layer in self.task_layers else shared
            x = F.linear(x, src[f"weight{layer}"], src[f"bias{layer}"])
            if layer < last:
                x = F.relu(x)
        return x


def _mlp(per_task: str) -> Callable[[int, int, int, AgentConfig], Network]:
    return lambda in_dim, out_dim, num_tasks, cfg: MLP(in_dim, out_dim, list(cfg.hidden_sizes), num_tasks, per_task,
                                                       cfg.init)  # fmt: skip


# name -> how to build one network of it: (in_dim, out_dim, number of tasks, the agent's config)
ARCHITECTURES: dict[str, Callable[[int, int, int, AgentConfig], Network]] = {
    "shared": _mlp("none"),  # one network for all tasks ("MTL SAC"; with the task one-hot: "+ TE")
    "multihead": _mlp("head"),  # a shared trunk, one output layer per task
    "independent": _mlp("all"),  # one network per task: the single-task reference
}
