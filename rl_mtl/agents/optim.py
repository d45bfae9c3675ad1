"""Adam over a population's stacked parameters, skipped per seed on the device.

torch.optim's fused Adam can skip a step on the device (its ``found_inf`` flag), but only for
all of its parameters at once; a population needs one decision per seed. So the step is
written out here as tensor operations over the stacked [S, ...] parameters, with the
arithmetic of ``torch.optim.Adam`` (tested against it), and every seed whose ``ok`` is False
keeps its parameters, moments and step count exactly. It is a pure function of tensors, so a
compiled update fuses it into a few kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_map

BETAS = (0.9, 0.999)
EPS = 1e-8


def paired_leaves(*trees: Any) -> list[tuple[Tensor, ...]]:
    """The leaves of trees of one shape, matched by their path (dict key order may differ)."""
    first, _ = tree_flatten_with_path(trees[0])
    others = [dict(tree_flatten_with_path(tree)[0]) for tree in trees[1:]]
    return [(leaf, *(other[path] for other in others)) for path, leaf in first]


def adam_init(params: Any) -> dict[str, Any]:
    """Zero moments shaped like ``params`` (any tree of tensors) and a zero step count (one per
    seed when the leaves have a seed axis: give ``num_seeds``-stacked params to ``adam_step``)."""
    leaves, _ = tree_flatten(params)
    return {
        "step": torch.zeros((), dtype=torch.float32, device=leaves[0].device),
        "exp_avg": tree_map(torch.zeros_like, params),
        "exp_avg_sq": tree_map(torch.zeros_like, params),
    }


def adam_step(params: Any, grads: Any, state: dict[str, Any], ok: Tensor, lr: float) -> None:
    """In place: one Adam step of every seed whose ``ok`` [S] is True. ``params``, ``grads`` and
    the moments are trees of [S, ...] tensors; ``state["step"]`` is [S]. A gradient may be
    non-finite where ``ok`` is False: such a seed's step is multiplied by zero after its
    gradient is zeroed, so it changes nothing, bit for bit."""
    beta1, beta2 = BETAS
    on = ok.to(state["step"].dtype)  # [S]: 1 steps, 0 skips
    step = state["step"].add_(on)
    # per seed: the moments' weights, and lr / bias correction (zero where the seed skips)
    w1, w2 = on * (1 - beta1), on * (1 - beta2)
    decay2 = 1 - w2
    bias2_sqrt = torch.where(step > 0, 1 - torch.pow(beta2, step), 1.0).sqrt()
    step_size = on * lr / torch.where(step > 0, 1 - torch.pow(beta1, step), 1.0)
    for p, g, m, v in paired_leaves(params, grads, state["exp_avg"], state["exp_avg_sq"]):
        shape = (-1,) + (1,) * (p.ndim - 1)
        g = torch.where(ok.view(shape), g, 0.0)  # a skipped seed's gradient may be inf or nan
        m.lerp_(g, w1.view(shape))
        v.mul_(decay2.view(shape)).addcmul_(g, g * w2.view(shape))
        denom = (v.sqrt() / bias2_sqrt.view(shape)).add_(EPS)
        p.sub_(m * step_size.view(shape) / denom)
