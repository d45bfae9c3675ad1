"""Gradient aggregators: ``weights = aggregator(gramian, losses)``; the update is ``weights @ G``.

Use ``make_aggregator(name, **options)``; ``AGGREGATORS`` maps names to classes.
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import Aggregator, AggregatorError, aggregate_together
from .cagrad import CAGrad
from .fairgrad import FairGrad
from .imtlg import IMTLG
from .ls import LinearScalarization
from .mgda import MGDA
from .nashmtl import NashMTL
from .pcgrad import PCGrad

AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls for cls in (LinearScalarization, NashMTL, FairGrad, PCGrad, CAGrad, MGDA, IMTLG)
}


def valid_options(name: str) -> list[str]:
    """The option names ``make_aggregator(name, ...)`` accepts."""
    params = inspect.signature(AGGREGATORS[name].__init__).parameters
    return [p for p in params if p != "self"]


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build an aggregator by name, with clear errors for unknown names and options."""
    if name not in AGGREGATORS:
        raise AggregatorError(f"unknown aggregation method {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}")
    allowed = valid_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = ", ".join(allowed) if allowed else "none"
        raise AggregatorError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {hint}")
    return AGGREGATORS[name](**options)


__all__ = ["AGGREGATORS", "Aggregator", "AggregatorError", "aggregate_together", "make_aggregator", "valid_options"]
