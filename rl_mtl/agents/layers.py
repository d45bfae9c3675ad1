"""Building blocks of the multi-task networks: initialisation, MLPs and stacked experts written
over explicit parameter dicts."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

Params = dict[str, Tensor]


def uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def init_linear(out_dim: int, in_dim: int, scheme: str, generator: torch.Generator,
                copies: int | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One [out, in] layer (``copies`` of them, stacked: [copies, out, in]): PyTorch's nn.Linear
    default (``scheme`` "default"), or Xavier-uniform weights and zero biases ("xavier")."""
    lead = () if copies is None else (copies,)
    if scheme == "xavier":
        weight = uniform((*lead, out_dim, in_dim), math.sqrt(6.0 / (in_dim + out_dim)), generator)
        return weight, torch.zeros(*lead, out_dim)
    bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform(a=sqrt(5)): weights and biases within 1/sqrt(fan_in)
    if copies is None:
        return uniform((out_dim, in_dim), bound, generator), uniform((out_dim,), bound, generator)
    drawn = [
        (uniform((out_dim, in_dim), bound, generator), uniform((out_dim,), bound, generator)) for _ in range(copies)
    ]
    return torch.stack([w for w, _ in drawn]), torch.stack([b for _, b in drawn])


def mlp_init(dims: list[int], scheme: str, generator: torch.Generator, prefix: str,
             copies: int | None = None) -> Params:  # fmt: skip
    """The layers of an MLP over ``dims`` as ``<prefix>.weight<i>`` / ``<prefix>.bias<i>``."""
    params = {}
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        params[f"{prefix}.weight{i}"], params[f"{prefix}.bias{i}"] = init_linear(d_out, d_in, scheme, generator, copies)
    return params


def mlp_forward(params: Params, prefix: str, layers: int, x: Tensor, last_relu: bool = False) -> Tensor:
    """Apply ``mlp_init``'s layers: ReLU between them (and after the last with ``last_relu``)."""
    for i in range(layers):
        x = F.linear(x, params[f"{prefix}.weight{i}"], params[f"{prefix}.bias{i}"])
        if i < layers - 1 or last_relu:
            x = F.relu(x)
    return x


def experts_forward(params: Params, prefix: str, layers: int, x: Tensor) -> Tensor:
    """k stacked MLPs (``mlp_init(..., copies=k)``) on the same input: x [B, in] -> [B, k, out]."""
    h = torch.einsum("bi,koi->bko", x, params[f"{prefix}.weight0"]) + params[f"{prefix}.bias0"]
    for i in range(1, layers):
        h = torch.einsum("bki,koi->bko", F.relu(h), params[f"{prefix}.weight{i}"]) + params[f"{prefix}.bias{i}"]
    return h
