"""PCGrad (Yu et al., NeurIPS 2020): project away conflicting components, then average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Aggregator, normalize_gramian


def pcgrad_weights(a: Tensor, order: Tensor) -> Tensor:
    """PCGrad as weights on the original gradients, from the Gramian alone.

    ``order[i]`` is the (random) order in which task i visits the tasks; itself is skipped
    (Algorithm 1 of the paper projects onto the *other* tasks). Row i of ``coef`` holds
    g_i^PC = sum_k coef[i, k] g_k; projecting onto g_j only changes coef[i, j]. All tasks take
    their s-th projection together, so the loop has K steps of [K, K] tensor work.
    Returns the mean of the projected gradients' coefficients ("mean" reduction).
    """
    k = a.shape[0]
    rows = torch.arange(k, device=a.device)
    coef = torch.eye(k, dtype=a.dtype, device=a.device)
    sq_norms = torch.diagonal(a)
    tiny = torch.finfo(a.dtype).tiny
    for s in range(k):
        j = order[:, s]
        dots = (coef @ a)[rows, j]  # g_i^PC . g_j
        conflict = (dots < 0) & (j != rows) & (sq_norms[j] > tiny)
        shift = torch.where(conflict, dots / torch.where(conflict, sq_norms[j], 1.0), 0.0)
        coef = coef.index_put((rows, j), -shift, accumulate=True)
    return coef.mean(dim=0)


class PCGrad(Aggregator):
    """PCGrad with mean reduction. Each call draws K random task orders (one per task) from
    ``generator``, a CPU ``torch.Generator`` the caller seeds; its state is part of
    ``state_dict()`` so a resumed run draws the same orders. A task with a zero gradient is
    never projected onto (no fallback needed).
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def draw(self, k: int) -> dict[str, Tensor]:
        """K task orders [K, K] (row i: the order task i visits the others), on the CPU."""
        return {"order": torch.argsort(torch.rand(k, k, generator=self.generator), dim=1)}

    def _weights(self, gramian: Tensor, losses: Tensor | None, order: Tensor) -> tuple[Tensor, Tensor]:
        order = order.to(gramian.device, non_blocking=True)
        a, _, _ = normalize_gramian(gramian)  # the weights are scale invariant
        return pcgrad_weights(a, order), self.no_fallback(gramian)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
