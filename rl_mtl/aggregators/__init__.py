"""Gradient aggregators: ``weights = aggregator(gramian, losses)``; the update is ``weights @ G``.

The registry ``AGGREGATORS`` (name -> class) is the one list of methods: the config's
validation, the command lines' choices, the benchmarks and the tests read it. Adding a method
is one module with an ``Aggregator`` subclass plus one entry below.
"""

from __future__ import annotations

import inspect
from typing import Any

from .auxinash import AuxiNash
from .base import Aggregator, AggregatorError, State, aggregate
from .cagrad import CAGrad
from .fairgrad import FairGrad
from .imtlg import IMTLG
from .ls import LinearScalarization
from .mgda import MGDA
from .nashmtl import NashMTL
from .pcgrad import PCGrad

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (LinearScalarization, NashMTL, FairGrad, PCGrad, CAGrad, MGDA, IMTLG, AuxiNash)
}
METHODS: tuple[str, ...] = tuple(AGGREGATORS)


def valid_options(name: str) -> list[str]:
    """The option names ``make_aggregator(name, ...)`` accepts."""
    params = inspect.signature(AGGREGATORS[name].__init__).parameters
    return [p for p in params if p not in ("self", "args", "kwargs")]


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build an aggregator by name, with clear errors for unknown names and bad options."""
    if name not in AGGREGATORS:
        raise AggregatorError(f"unknown aggregation method {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}")
    allowed = valid_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = ", ".join(allowed) if allowed else "none"
        raise AggregatorError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {hint}")
    return AGGREGATORS[name](**options)


__all__ = [
    "AGGREGATORS", "METHODS", "Aggregator", "AggregatorError", "State", "aggregate", "make_aggregator",
    "valid_options",
]  # fmt: skip
