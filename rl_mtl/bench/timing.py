"""How the benchmarks measure: interleaved timing and kernel counts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin (every variant once per
    round, so a noisy neighbour slows all of them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


class KernelCount(TorchDispatchMode):
    """Counts the ATen operations that compute something (views excluded): on a GPU each is a
    kernel launch, and in eager mode launches, not arithmetic, set the cost of K x K solves."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable[[], Any]) -> int:
    with KernelCount() as counter:
        fn()
    return counter.count
