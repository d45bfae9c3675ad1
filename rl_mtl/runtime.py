"""The process a run trains in: device, deterministic kernels, compiling the update (the mode a
run gets, and the compile helper every compiled part uses), the global random generators (seeding,
and their states for checkpoints)."""

from __future__ import annotations

import os
import platform
import random
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .aggregators import make_aggregator
from .config import Config, ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was requested but torch.cuda.is_available() is False; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_determinism(cfg: Config, device: torch.device) -> bool:
    """Deterministic kernels: on by default on the CPU, opt-in on CUDA (README: Reproducibility)."""
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type == "cpu"
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    return deterministic


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device``: its CPU backend compiles C++, and
    Triton (CUDA) builds its launcher with a C compiler (``$CXX`` / ``$CC`` when set)."""
    if device.type == "cuda":
        names = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    else:
        names = [os.environ.get("CXX", ""), "g++", "clang++"]
    return any(name and shutil.which(name) for name in names)


def resolve_compile(cfg: Config, device: torch.device) -> str:
    """train.compile as a mode for ``device`` (config.COMPILE_MODES): None means "passes" on the
    CPU (measured to pay, README: Speed) when a compiler is installed, "off" on CUDA (not yet
    measured on a GPU); true means "passes", false "off". Refused where the method cannot run
    that way (its ``on_device`` and ``graph_safe``)."""
    setting = cfg.train.compile
    if setting is None:
        return "passes" if device.type == "cpu" and compiler_available(device) else "off"
    mode = {True: "passes", False: "off"}.get(setting, setting)  # type: ignore[call-overload]
    aggregator = make_aggregator(cfg.method, **cfg.method_options.get(cfg.method, {}))
    if mode == "graphs" and device.type != "cuda":
        raise ConfigError("train.compile=graphs replays the update as a CUDA graph: it needs --device cuda; "
                          "on the CPU use train.compile=whole")  # fmt: skip
    if mode in ("whole", "graphs") and not aggregator.on_device:
        raise ConfigError(f"train.compile={mode} compiles the whole update, but {cfg.method} with method_options "
                          f"{aggregator.options()} solves on the host; use its native solver or "
                          "train.compile=passes")  # fmt: skip
    if mode == "graphs" and not aggregator.graph_safe:
        raise ConfigError(f"{cfg.method} cannot run in a CUDA graph (it reads a result back to the host on CUDA); "
                          "use train.compile=whole")  # fmt: skip
    if mode != "off" and not compiler_available(device):
        needed = "a C compiler (gcc) for Triton" if device.type == "cuda" else "a C++ compiler (g++)"
        raise ConfigError(f"train.compile={setting} needs {needed} on PATH; install one or set train.compile=off")
    return mode


# Dynamo keeps its graphs per code object, and every compiled pass is a closure over the same code
# (vmap's wrapper; a population's update is one method of the class): it counts their graphs as
# recompilations of that code, with `fullgraph` a hard failure past its limit (8). A process that
# builds several agents (a benchmark's dozens of variants, the tests) needs room for all of them.
RECOMPILE_LIMIT = 512


def compile_graph(fn: Callable, mode: str | None = None) -> Callable:
    """``fn`` compiled whole: ``fullgraph`` because a graph break would silently leave part of it
    eager; ``dynamic=False`` because a run's shapes never change."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    return compile_graph(fn) if enabled else fn


def describe_device(device: torch.device) -> str:
    """The device as run.json records it."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def seed_everything(seed: int) -> None:
    """The process-global generators (Meta-World's goal sampling reads numpy's when an env is built)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The process-global generators' states, as plain numbers and tensors (checkpointable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    keys = np.asarray(npy["keys"], dtype=np.int64).astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
