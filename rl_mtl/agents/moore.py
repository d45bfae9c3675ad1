"""MOORE, a mixture of orthogonal experts (Hendawy, Peters, D'Eramo, ICLR 2024), as its authors'
code computes it.

For one task k and a batch of inputs x [B, in]:

    u_1 .. u_E = expert_1(x) .. expert_E(x)      E MLPs with linear last layers: [B, E, R]
    e_1 .. e_E = Gram-Schmidt(u_1 .. u_E)        per input, over the experts, in fixed order:
                                                 e_i = (u_i - sum_{j<i} (u_i . e_j) e_j) / |...|
    v   = tanh(sum_i w_k[i] e_i)                 w_k: task k's own mixing weights (no softmax)
    out = W_k v + b_k                            task k's own output head

Shared: the experts. Per task: the mixing weights (a Linear(K -> E) without bias, on the one-hot)
and the output head. Published MT10 settings (the authors' MT10 scripts): E = 4 experts of three
400-wide layers (``agent.hidden_sizes``), the task one-hot out of the observation, log-std in
[-10, 2] and a temperature learning rate of 1e-4 (``configs/mt10-moore.yaml``). Initialisation
as their code runs it: experts with PyTorch's nn.Linear default, mixing weights and head weights
Xavier-uniform, head biases PyTorch's default. Gram-Schmidt here subtracts each projection from
the running remainder (the modified form: the same vectors in exact arithmetic, fewer rounding
errors) and floors the norms at 1e-8 (as Meta-World+'s port guards them), so that zero outputs stay
finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import check_option
from .layers import Params, experts_forward, init_linear, mlp_init, uniform

NORM_EPS = 1e-8


def gram_schmidt(u: Tensor) -> Tensor:
    """[B, E, R] -> [B, E, R]: for every input, the E vectors made orthonormal in order."""
    basis: list[Tensor] = []
    for i in range(u.shape[-2]):
        w = u[..., i, :]
        for e in basis:
            w = w - (w * e).sum(-1, keepdim=True) * e
        basis.append(w / w.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS))
    return torch.stack(basis, dim=-2)


class MOORE:
    def __init__(self, obs_dim: int, extra_dim: int, out_dim: int, tasks: list[str], hidden_sizes: list[int],
                 init: str, num_experts: int = 4) -> None:  # fmt: skip
        check_option("moore", "num_experts", num_experts, 1, integer=True)
        if num_experts > hidden_sizes[-1]:
            raise ValueError(f"moore: {num_experts} experts cannot be orthonormal in {hidden_sizes[-1]} dimensions "
                             "(the last of agent.hidden_sizes)")  # fmt: skip
        self.dims = [obs_dim + extra_dim, *hidden_sizes]
        self.out_dim, self.num_tasks, self.experts, self.init_scheme = out_dim, len(tasks), num_experts, init

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        g, k, rep = generator, self.num_tasks, self.dims[-1]
        shared = mlp_init(self.dims, "xavier" if self.init_scheme == "xavier" else "default", g, "experts",
                          copies=self.experts)  # fmt: skip
        task = {"mixing": uniform((k, self.experts), math.sqrt(6.0 / (k + self.experts)), g)}  # Linear(K -> E).T
        task["head.weight"] = uniform((k, self.out_dim, rep), math.sqrt(6.0 / (rep + self.out_dim)), g)
        task["head.bias"] = (torch.zeros(k, self.out_dim) if self.init_scheme == "xavier"
                             else init_linear(self.out_dim, rep, "default", g, copies=k)[1])  # fmt: skip
        return shared, task

    def representation(self, shared: Params, task: Params, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the orthonormal expert outputs [B, E, R], the mixed representation v [B, R])."""
        e = gram_schmidt(experts_forward(shared, "experts", len(self.dims) - 1, x))
        return e, torch.tanh(torch.einsum("k,bkr->br", task["mixing"], e))

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        return F.linear(self.representation(shared, task, x)[1], task["head.weight"], task["head.bias"])

    def describe(self) -> dict[str, Any]:
        return {}
