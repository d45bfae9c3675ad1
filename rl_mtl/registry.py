"""The registries: the one list of aggregation methods and the one list of network architectures.

Each entry names the class that implements it as ``"module:Class"``, so reading the names (the
config's validation, the command lines' choices, the benchmarks, the tests) imports nothing:
``import rl_mtl.config`` stays free of torch. ``component`` imports a class when something is
built; ``construct`` builds one with its options checked against the constructor's signature.

Adding a method or an architecture is one module with its class plus one line below.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from typing import Any

METHODS: dict[str, str] = {
    "ls": "rl_mtl.aggregators.ls:LinearScalarization",
    "nashmtl": "rl_mtl.aggregators.nashmtl:NashMTL",
    "fairgrad": "rl_mtl.aggregators.fairgrad:FairGrad",
    "pcgrad": "rl_mtl.aggregators.pcgrad:PCGrad",
    "cagrad": "rl_mtl.aggregators.cagrad:CAGrad",
    "mgda": "rl_mtl.aggregators.mgda:MGDA",
    "imtlg": "rl_mtl.aggregators.imtlg:IMTLG",
    "auxinash": "rl_mtl.aggregators.auxinash:AuxiNash",
}

ARCHITECTURES: dict[str, str] = {
    "shared": "rl_mtl.agents.networks:MLP",  # one network for all tasks ("MTL SAC"; with the task one-hot: "+ TE")
    "multihead": "rl_mtl.agents.networks:MultiHeadMLP",  # a shared trunk, one output layer per task
    "independent": "rl_mtl.agents.networks:IndependentMLPs",  # one network per task: the single-task reference
    "soft_modularization": "rl_mtl.agents.soft_modularization:SoftModularization",  # Yang et al., NeurIPS 2020
    "care": "rl_mtl.agents.care:CARE",  # Sodhani et al., ICML 2021
    "moore": "rl_mtl.agents.moore:MOORE",  # Hendawy et al., ICLR 2024
}


def component(table: dict[str, str], name: str) -> type:
    """The class registered as ``name`` in ``table`` (imported now)."""
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def option_names(cls: type, fixed: int = 0) -> list[str]:
    """The keyword options ``cls`` takes: its constructor's parameters after the first ``fixed``
    (the positional ones every entry of its registry takes)."""
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return params[fixed:]


def construct(cls: type, name: str, args: tuple[Any, ...], options: dict[str, Any], error: type[Exception]) -> Any:
    """``cls(*args, **options)``; an option its constructor does not take raises ``error`` naming
    the valid ones (the constructor checks the values itself)."""
    allowed = option_names(cls, len(args))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise error(f"{name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(allowed) or 'none'}")
    return cls(*args, **options)


def check_option(owner: str, name: str, value: Any, minimum: float, strict: bool = False, integer: bool = False,
                 note: str = "", error: type[Exception] = ValueError) -> None:  # fmt: skip
    """Refuse an option of ``owner`` (a method or an architecture) that is not a finite number (an
    integer, if ``integer``) >= ``minimum`` (> with ``strict``), raising ``error`` that says so."""
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = number and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > minimum if strict else value >= minimum)):
        kind = "an integer" if integer else "a finite number"
        raise error(f"{owner}: {name} must be {kind} {'>' if strict else '>='} {minimum:g}{note}, got {value!r}")


def check_choice(
    owner: str, name: str, value: Any, choices: Sequence[Any], error: type[Exception] = ValueError
) -> None:
    if value not in choices:
        raise error(f"{owner}: unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")
