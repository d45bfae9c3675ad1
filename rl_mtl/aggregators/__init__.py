"""Gradient aggregators: ``weights = aggregator(gramian, losses)``; the update is ``weights @ G``.

The methods are listed once, in ``rl_mtl.registry.METHODS``; ``AGGREGATORS`` maps those names to
their classes. Adding a method is one module with an ``Aggregator`` subclass plus one line there.
"""

from __future__ import annotations

from typing import Any

from ..registry import METHODS, component, construct
from .base import Aggregator, AggregatorError, Objective, State, aggregate

AGGREGATORS: dict[str, type[Aggregator]] = {name: component(METHODS, name) for name in METHODS}


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Build an aggregator by name, with clear errors for unknown names and bad options."""
    if name not in AGGREGATORS:
        raise AggregatorError(f"unknown aggregation method {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}")
    return construct(AGGREGATORS[name], name, (), options, AggregatorError)


__all__ = ["AGGREGATORS", "METHODS", "Aggregator", "AggregatorError", "Objective", "State", "aggregate",
           "make_aggregator"]  # fmt: skip
