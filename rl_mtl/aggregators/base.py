"""The aggregator interface: a K x K Gramian of task gradients (+ losses) -> K weights.

Every method works in float64 on the Gramian's device, whatever the input dtype, because the
Gramians of RL gradients span many orders of magnitude (1e-15 .. 1e15 in practice) and K is small.
Nothing here calls ``.item()``: degenerate cases are handled with ``torch.where`` and counted in a
device-side counter that the trainer reads only when it logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import vmap

from .solvers import may_read_back, sync_free


class AggregatorError(ValueError):
    """A bad aggregator name, option value or input, with a message that says how to fix it."""


def check_gramian(gramian: Tensor, losses: Tensor | None) -> int:
    """Validate shapes (never values: that would need a host sync); return K."""
    if not isinstance(gramian, Tensor) or gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        shape = tuple(gramian.shape) if isinstance(gramian, Tensor) else type(gramian).__name__
        raise AggregatorError(f"gramian must be a square [K, K] tensor, got {shape}")
    k = gramian.shape[0]
    if k < 1:
        raise AggregatorError("gramian must have at least one task (K >= 1)")
    if losses is not None and tuple(losses.shape) != (k,):
        raise AggregatorError(f"losses must have shape [{k}] to match the gramian, got {tuple(losses.shape)}")
    return k


def normalize_gramian(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Divide M by its mean diagonal (the mean squared task-gradient norm).

    Returns (A, scale, degenerate): A has mean diagonal 1, so solvers see O(1) numbers whatever
    the scale of the gradients; ``degenerate`` is True when every task gradient is zero (then A is
    the identity and the caller's weights only matter up to the zero direction).
    """
    k = gramian.shape[0]
    scale = torch.diagonal(gramian).sum() / k
    degenerate = ~(scale > torch.finfo(gramian.dtype).tiny)
    eye = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
    a = torch.where(degenerate, eye, gramian / safe_scale)
    return 0.5 * (a + a.T), safe_scale, degenerate


class Aggregator:
    """Base class. Subclasses implement ``_weights(gramian64, losses, **draws) -> (weights64,
    fallback)``, a pure function of its inputs and the constructor's options.

    ``fallback`` is a 0-dim bool tensor: True when the method could not apply its definition as
    stated and used its documented fallback (see each method's docstring). Non-finite input or
    output always falls back to the mean (1/K each) and is counted too.

    A call is three steps, so that ``aggregate_together`` can run the middle one for several
    seeds' aggregators at once: ``draw`` (this call's random inputs, from the aggregator's own
    generator), ``solve`` (pure: no state, no host reads on the sync-free path, ``vmap``-able)
    and ``record`` (the aggregator's state: fallback count, reused weights).
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._fallbacks: Tensor | None = None  # int64 counter living on the Gramian's device

    # -- public API --------------------------------------------------------------------------
    def __call__(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = check_gramian(gramian, losses)
        weights, fallback = self.solve(gramian, losses, self.draw(k))
        return self.record(gramian, weights, fallback)

    def draw(self, k: int) -> dict[str, Tensor]:
        """The random inputs of one call for K tasks (none by default; PCGrad's task orders)."""
        return {}

    def solve(self, gramian: Tensor, losses: Tensor | None, draws: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(weights, fallback) for one [K, K] Gramian, in the Gramian's dtype."""
        k = gramian.shape[-1]
        m = gramian.detach().to(torch.float64)
        finite = torch.isfinite(m).all()
        eye = torch.eye(k, dtype=torch.float64, device=m.device)
        m = torch.where(finite, m, eye)
        weights, fallback = self._weights(m, None if losses is None else losses.detach(), **draws)
        ok = finite & torch.isfinite(weights).all()
        mean = torch.full_like(weights, 1.0 / k)
        weights = torch.where(ok, weights, mean)
        return weights.to(dtype=gramian.dtype), fallback | ~ok

    def record(self, gramian: Tensor, weights: Tensor, fallback: Tensor) -> Tensor:
        """Update the state after a solve of ``gramian``; returns the weights to use."""
        self._count(fallback)
        return weights

    def batchable(self) -> bool:
        """Whether ``solve`` runs on the device without host reads (False for the host-side
        reference solvers), so that ``aggregate_together`` may vmap it."""
        return True

    def needs_gramian(self) -> bool:
        """Whether the next call needs the Gramian (False: pass None and skip computing it)."""
        return True

    @property
    def fallbacks(self) -> int:
        """How many calls used a fallback so far (reading it synchronises with the device)."""
        return 0 if self._fallbacks is None else int(self._fallbacks.item())

    def state_dict(self) -> dict[str, Any]:
        return {"fallbacks": self.fallbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fallbacks = torch.tensor(int(state.get("fallbacks", 0)), dtype=torch.int64)

    # -- for subclasses ----------------------------------------------------------------------
    def _weights(self, gramian: Tensor, losses: Tensor | None, **draws: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _count(self, fallback: Tensor) -> None:
        inc = fallback.to(torch.int64)
        if self._fallbacks is None:
            self._fallbacks = inc.clone()
        else:
            self._fallbacks = self._fallbacks.to(inc.device) + inc

    @staticmethod
    def no_fallback(like: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.bool, device=like.device)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def options(self) -> dict[str, Any]:
        """The constructor options this instance was built with (for logs and configs)."""
        return {}


def aggregate_together(aggregators: Sequence[Aggregator], gramians: Tensor | None, losses: Tensor) -> Tensor:
    """Several seeds' aggregators, each on its own seed's Gramian: gramians [S, K, K] (None on
    calls that need none), losses [S, K] -> weights [S, K].

    The aggregators are one method with one set of options (the seeds of one config), each with
    its own state: fallback count, Nash-MTL's reused weights, PCGrad's generator. Where solvers
    run their whole budget anyway (the GPU, ``sync_free()``) the solves of all seeds run as ONE
    ``vmap``, so S seeds cost the kernel launches of one solve (0.11-0.14x those of S calls for
    10 seeds). On the CPU each solve stops once converged, and one call per seed is faster for
    the few seeds a CPU trains together (2 seeds: 1.5 vs 5.5 ms for Nash-MTL; README:
    Benchmarks). Either way the weights are those of S separate calls, to float rounding.
    """
    lead = aggregators[0]
    together = (
        gramians is not None
        and not may_read_back(gramians)
        and all(a.needs_gramian() and a.batchable() for a in aggregators)
    )
    if not together:  # the CPU, reused weights, linear scalarisation, or a solver on the host
        return torch.stack([
            a(gramians[s] if gramians is not None and a.needs_gramian() else None, losses[s])
            for s, a in enumerate(aggregators)
        ])  # fmt: skip
    k = check_gramian(gramians[0], losses[0])
    per_seed = [a.draw(k) for a in aggregators]
    draws = {name: torch.stack([d[name] for d in per_seed]) for name in per_seed[0]}
    with sync_free():
        weights, fallback = vmap(lead.solve)(gramians, losses, draws)
    return torch.stack([a.record(gramians[s], weights[s], fallback[s]) for s, a in enumerate(aggregators)])
