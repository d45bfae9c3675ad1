"""Per-task gradients in one batched pass, their Gramian, and writing the combined gradient back.

A *task loss function* has the signature ``task_loss(shared, task, task_batch) -> loss`` (or
``(loss, aux)`` with ``has_aux=True``), where ``shared`` maps names to the shared parameters,
``task`` maps names to ONE task's slice of the task-specific parameters and ``task_batch`` is
one task's slice of the batch. ``torch.func.vmap`` runs it over the task axis, so the K
per-task gradients cost about one ordinary backward pass instead of K of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

Params = Mapping[str, Tensor]
TaskLoss = Callable[..., Any]


@dataclass
class TaskGradients:
    """The result of one batched per-task backward pass (K tasks, P shared numbers)."""

    losses: Tensor  # [K] task losses
    # G in blocks, one per shared parameter: name -> [K, *param.shape]. Row i of G is task i's
    # gradient over all shared parameters; keeping the blocks avoids copying G into one matrix.
    shared: dict[str, Tensor]
    task_specific: dict[str, Tensor]  # name -> [K, ...]: each task's gradient of its own slice
    aux: Any = None  # whatever the loss function returned beside the loss, stacked over tasks

    # A seed-batched pass (``over_seeds``) gives the same fields with a leading seed axis:
    # losses [S, K], blocks [S, K, ...]; ``total``, ``gramian`` and ``combine`` then work per seed.

    @property
    def num_tasks(self) -> int:
        return self.losses.shape[-1]

    def total(self) -> Tensor:
        """The sum of every loss and gradient entry (per seed when seed-batched): finite exactly
        when all of them are (barring an overflow of the sum itself, which only makes the check
        stricter)."""
        lead = self.losses.ndim - 1  # 0, or 1 with a seed axis

        def entry_sum(t: Tensor) -> Tensor:
            return t.reshape(*t.shape[:lead], -1).sum(-1)

        parts = [entry_sum(self.losses)]
        parts += [entry_sum(g) for g in self.shared.values()]
        parts += [entry_sum(g) for g in self.task_specific.values()]
        return torch.stack(parts).sum(0)

    def matrix(self) -> Tensor:
        """G as one [K, P] matrix (a copy; for tests and diagnostics)."""
        k = self.num_tasks
        blocks = [g.reshape(k, -1) for g in self.shared.values()]
        return torch.cat(blocks, dim=1) if blocks else self.losses.new_zeros((k, 0))

    def gramian(self) -> Tensor:
        """M = G G^T, [K, K] (or [S, K, K] when seed-batched), summed block by block."""
        lead, k = self.losses.shape[:-1], self.num_tasks
        m = self.losses.new_zeros((lead.numel(), k, k))
        for g in self.shared.values():
            flat = g.reshape(lead.numel(), k, -1)
            m = torch.baddbmm(m, flat, flat.mT)
        return m.reshape(*lead, k, k)

    def combine(self, weights: Tensor) -> dict[str, Tensor]:
        """weights @ G, as one tensor per shared parameter; weights [K], or [S, K] with a seed axis
        (each seed's weights on its own gradients, one batched product per parameter)."""
        lead = weights.shape[:-1]
        combined = {}
        for name, g in self.shared.items():
            rows = g.reshape(*lead, self.num_tasks, -1)  # [..., K, numel]
            combined[name] = (weights.to(g.dtype)[..., None, :] @ rows).reshape(*lead, *g.shape[len(lead) + 1 :])
        return combined


def detached(params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in params.items()}


def task_gradients(
    task_loss: TaskLoss, shared: Params, task_specific: Params, batch: Any, has_aux: bool = False
) -> TaskGradients:
    """All K per-task gradients at once: ``vmap`` over the task axis of ``grad``."""
    return TaskGradients(*task_gradient_fields(task_loss, shared, task_specific, batch, has_aux))


def task_gradient_fields(
    task_loss: TaskLoss, shared: Params, task_specific: Params, batch: Any, has_aux: bool = False
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], Any]:
    """``task_gradients`` as a plain tuple (losses, shared, task_specific, aux): the form an
    outer ``vmap`` over seeds can return (see ``over_seeds``)."""
    grad_fn = grad_and_value(task_loss, argnums=(0, 1), has_aux=has_aux)
    (shared_grads, task_grads), value = vmap(grad_fn, in_dims=(None, 0, 0))(
        detached(shared), detached(task_specific), batch
    )
    losses, aux = value if has_aux else (value, None)
    return losses.detach(), dict(shared_grads), dict(task_grads), aux


def over_seeds(per_seed: Callable[..., tuple]) -> Callable[..., tuple]:
    """Several independent agents' per-task gradients in one pass: ``per_seed(*args)`` returns
    one seed's ``task_gradient_fields``; the result is ``vmap``-ed over the leading seed axis of
    every argument (S seeds x K tasks cost about one batched backward pass) and returns the
    fields for ``TaskGradients(*fields)``, with the leading seed axis."""

    def fields(*args: Any) -> tuple:
        losses, shared, task_specific, aux = per_seed(*args)
        return (losses, shared, task_specific) if aux is None else (losses, shared, task_specific, aux)  # vmap: no None

    return vmap(fields)


def task_gradients_loop(task_loss: TaskLoss, shared: Params, task_specific: Params, batch: Any) -> TaskGradients:
    """The same, with K separate backward passes: the reference the batched pass is tested
    against (and benchmarked against). No ``has_aux``."""
    k = next(iter(torch.utils._pytree.tree_leaves(batch))).shape[0]
    names = list(shared)
    losses, shared_rows, task_rows = [], {n: [] for n in names}, {n: [] for n in task_specific}
    for i in range(k):
        shared_i = {n: p.detach().requires_grad_(True) for n, p in shared.items()}
        task_i = {n: p[i].detach().requires_grad_(True) for n, p in task_specific.items()}
        batch_i = torch.utils._pytree.tree_map(lambda x, i=i: x[i], batch)
        loss = task_loss(shared_i, task_i, batch_i)
        inputs = [shared_i[n] for n in names] + list(task_i.values())
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        for name, g in zip(names, grads[: len(names)], strict=True):
            shared_rows[name].append(g)
        for name, g in zip(task_i, grads[len(names) :], strict=True):
            task_rows[name].append(g)
        losses.append(loss.detach())
    return TaskGradients(
        losses=torch.stack(losses),
        shared={n: torch.stack(g) for n, g in shared_rows.items()},
        task_specific={n: torch.stack(g) for n, g in task_rows.items()},
    )


def write_gradients(
    shared: Mapping[str, nn.Parameter],
    task_specific: Mapping[str, nn.Parameter],
    grads: TaskGradients,
    weights: Tensor,
) -> None:
    """Set ``.grad`` for a torch optimiser: the shared parameters get ``weights @ G``; each
    task-specific slice gets its own task's plain (unweighted) gradient."""
    for name, g in grads.combine(weights).items():
        shared[name].grad = g
    for name, p in task_specific.items():
        p.grad = grads.task_specific[name].detach()
