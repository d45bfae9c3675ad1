"""Soft Modularization (Yang, Xu, Wu, Wang, NeurIPS 2020), as its authors' code computes it.

For one task k and a batch of inputs x [B, in]:

    h = W_b2 relu(W_b1 x)                       state embedding [B, D] (no final ReLU)
    z = e_k + b_e                                task embedding [D]: a one-hot through Linear(K -> D)
    g = W_g2 relu(W_g1 relu(z * h))              routing trunk [B, G]
    P^1 = softmax(W_d^1 relu(g))                 [B, n, n]; softmax over the source modules
    P^l = softmax(W_d^l relu(W_u^l [P^1..P^(l-1)] * g)),  l = 2 .. L-1: each layer's routing sees all earlier ones
    q   = softmax(W_d^L relu(W_u^L [P^1..P^(L-1)] * g))   [B, n]: weights of the last layer's modules
    y^1_j = M^1_j(relu(h)),   y^(l+1)_i = M^(l+1)_i(relu(sum_j P^l[i, j] y^l_j))
    out = W_o relu(sum_j q_j y^L_j)

Every module M^l_j is one linear layer (D -> d in the first layer, d -> d after). The task's
only parameter of its own is its embedding column e_k; everything else is shared, so the
aggregator weighs every task's gradient on it. Published MT10 settings (the authors'
``meta_config/mt10``): L = 2 layers of n = 2 modules of width d = 256 ("shallow"; L = 4, n = 4,
d = 128 is "deep"), D = 400, G = 256, and the task one-hot out of the observation (it enters
through e_k). Initialisation as their code: hidden weights U(+-1/sqrt(fan_out)), hidden biases
0.1, routing heads and the output layer U(+-3e-3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import check_option
from .layers import Params, uniform


class SoftModularization:
    def __init__(self, obs_dim: int, extra_dim: int, out_dim: int, tasks: list[str], hidden_sizes: list[int],
                 init: str, num_layers: int = 2, num_modules: int = 2, module_width: int = 256,
                 embedding_width: int = 400, routing_width: int = 256) -> None:  # fmt: skip
        name = "soft_modularization"
        check_option(name, "num_layers", num_layers, 2, integer=True)
        for option, value in (("num_modules", num_modules), ("module_width", module_width),
                              ("embedding_width", embedding_width), ("routing_width", routing_width)):  # fmt: skip
            check_option(name, option, value, 1, integer=True)
        self.in_dim, self.out_dim, self.num_tasks = obs_dim + extra_dim, out_dim, len(tasks)
        self.layers, self.modules, self.width = num_layers, num_modules, module_width
        self.embedding, self.routing, self.init_scheme = embedding_width, routing_width, init

    def _layer(self, out_dim: int, in_dim: int, g: torch.Generator, head: bool = False,
               copies: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:  # fmt: skip
        """A linear layer initialised as the authors' code does (``head``: a routing head or the
        output layer), or Xavier-uniform with zero biases."""
        shape = (*copies, out_dim, in_dim)
        if self.init_scheme == "xavier":
            return uniform(shape, math.sqrt(6.0 / (in_dim + out_dim)), g), torch.zeros(*copies, out_dim)
        if head:
            return uniform(shape, 3e-3, g), uniform((*copies, out_dim), 3e-3, g)
        return uniform(shape, 1.0 / math.sqrt(out_dim), g), torch.full((*copies, out_dim), 0.1)

    def init(self, generator: torch.Generator) -> tuple[Params, Params]:
        g, n, d, big, small = generator, self.modules, self.width, self.embedding, self.routing
        shared: Params = {}
        shared["base.weight0"], shared["base.bias0"] = self._layer(big, self.in_dim, g)
        shared["base.weight1"], shared["base.bias1"] = self._layer(big, big, g)
        embedding, shared["task_embedding.bias"] = self._layer(big, self.num_tasks, g)
        task = {"task_embedding": embedding.T.contiguous()}  # [K, D]: task k's column of Linear(K -> D)
        shared["routing.weight0"], shared["routing.bias0"] = self._layer(small, big, g)
        shared["routing.weight1"], shared["routing.bias1"] = self._layer(small, small, g)
        for layer in range(self.layers):
            last = layer == self.layers - 1
            shared[f"head{layer}.weight"], shared[f"head{layer}.bias"] = self._layer(n if last else n * n, small, g,
                                                                                     head=True)  # fmt: skip
            if layer > 0:
                shared[f"cond{layer}.weight"], shared[f"cond{layer}.bias"] = self._layer(small, layer * n * n, g)
            shared[f"modules{layer}.weight"], shared[f"modules{layer}.bias"] = self._layer(
                d, big if layer == 0 else d, g, copies=(n,)
            )
        shared["out.weight"], shared["out.bias"] = self._layer(self.out_dim, d, g, head=True)
        return shared, task

    def routing_weights(self, shared: Params, task: Params, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """(P^1 .. P^(L-1) [B, n, n], q [B, n], h [B, D]) for one task's inputs x [B, in]."""
        h = F.linear(F.relu(F.linear(x, shared["base.weight0"], shared["base.bias0"])), shared["base.weight1"],
                     shared["base.bias1"])  # fmt: skip
        z = task["task_embedding"] + shared["task_embedding.bias"]
        g = F.relu(F.linear(F.relu(z * h), shared["routing.weight0"], shared["routing.bias0"]))
        g = F.linear(g, shared["routing.weight1"], shared["routing.bias1"])
        n, probs = self.modules, []
        for layer in range(self.layers):
            if layer == 0:
                u = g
            else:
                flat = torch.cat([p.flatten(-2) for p in probs], dim=-1)
                u = F.linear(flat, shared[f"cond{layer}.weight"], shared[f"cond{layer}.bias"]) * g
            logits = F.linear(F.relu(u), shared[f"head{layer}.weight"], shared[f"head{layer}.bias"])
            if layer == self.layers - 1:
                return probs, torch.softmax(logits, dim=-1), h
            probs.append(torch.softmax(logits.unflatten(-1, (n, n)), dim=-1))
        raise AssertionError("unreachable: num_layers >= 2")

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        probs, q, h = self.routing_weights(shared, task, x)
        y = torch.einsum("bi,noi->bno", F.relu(h), shared["modules0.weight"]) + shared["modules0.bias"]
        for layer in range(1, self.layers):
            mixed = F.relu(torch.einsum("bij,bjd->bid", probs[layer - 1], y))  # destination i, source j
            y = torch.einsum("bni,noi->bno", mixed, shared[f"modules{layer}.weight"]) + shared[f"modules{layer}.bias"]
        return F.linear(F.relu(torch.einsum("bn,bnd->bd", q, y)), shared["out.weight"], shared["out.bias"])

    def describe(self) -> dict[str, Any]:
        return {}
