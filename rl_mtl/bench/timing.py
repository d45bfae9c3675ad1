"""How the benchmarks measure: interleaved timing and kernel counts."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
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
    """ATen kernels an eager call dispatches (``KernelCount``)."""
    with KernelCount() as counter:
        fn()
    return counter.count


COMPILED_GRAPH = "## Call CompiledFxGraph"  # the profiler's range around a compiled graph's code
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_"}
CUDA_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch")


def count_executed(fn: Callable[[], Any], device: torch.device) -> int:
    """What one call of ``fn`` executes, eager and compiled parts alike, counted from a profile.

    On CUDA: the kernel launches the host issues (a replayed CUDA graph is one). Elsewhere: every
    operator call outside compiled code that no other operator call contains, views and bare
    allocations excluded (what the eager parts dispatch), plus every call a compiled graph makes:
    its generated kernels and its external kernels (matrix products, solves). The generated
    kernels appear in the profile only when compiled with ``inductor.config.cpp.
    enable_kernel_profile`` (``profile_compiled_kernels``)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(e.name.startswith(CUDA_LAUNCHES) for e in events)
    count = 0
    for event in events:
        parent = event.cpu_parent
        if parent is not None and parent.name.startswith(COMPILED_GRAPH):
            count += event.name not in ALLOCATIONS
            continue
        if not event.name.startswith("aten::") or event.name in ALLOCATIONS or _is_view(event.name):
            continue
        ancestors = []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        count += not any(name.startswith(("aten::", COMPILED_GRAPH)) for name in ancestors)
    return count


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines on file descriptor 2 each time; a
    benchmark's table is easier to read without them (Python's own errors still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _is_view(name: str) -> bool:
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    overload = getattr(packet, "default", None)
    return bool(overload is not None and overload.is_view)


def profile_compiled_kernels() -> None:
    """Make the CPU kernels compiled from now on show in a profile (``count_executed``); a
    benchmark's setting (each kernel then records itself, a small cost)."""
    from torch._inductor import config

    config.cpp.enable_kernel_profile = True
