"""The aggregator interface: a K x K Gramian of task gradients (+ losses) -> K weights.

Every method works in float64 on the Gramian's device, whatever the input dtype, because the
Gramians of RL gradients span many orders of magnitude (1e-15 .. 1e15 in practice) and K is small.
Nothing here calls ``.item()``: degenerate cases are handled with ``torch.where`` and counted in a
device-side counter that the trainer reads only when it logs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


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
    """Base class. Subclasses implement ``_weights(gramian64, losses) -> (weights64, fallback)``.

    ``fallback`` is a 0-dim bool tensor: True when the method could not apply its definition as
    stated and used its documented fallback (see each method's docstring). Non-finite input or
    output always falls back to the mean (1/K each) and is counted too.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._fallbacks: Tensor | None = None  # int64 counter living on the Gramian's device

    # -- public API --------------------------------------------------------------------------
    def __call__(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = check_gramian(gramian, losses)
        m = gramian.detach().to(torch.float64)
        finite = torch.isfinite(m).all()
        eye = torch.eye(k, dtype=torch.float64, device=m.device)
        m = torch.where(finite, m, eye)
        weights, fallback = self._weights(m, None if losses is None else losses.detach())
        ok = finite & torch.isfinite(weights).all()
        mean = torch.full_like(weights, 1.0 / k)
        weights = torch.where(ok, weights, mean)
        self._count(fallback | ~ok)
        return weights.to(dtype=gramian.dtype)

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
    def _weights(self, gramian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
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
