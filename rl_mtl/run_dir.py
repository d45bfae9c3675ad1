"""Run directories: where runs go, the files in them, atomic writes, and what a run was made with
(``run.json``: package versions, git commit, device, seed)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch

from .config import Config

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run.json"
RECORDED_PACKAGES = ("torch", "metaworld", "mujoco", "gymnasium", "numpy", "cvxpy", "clarabel", "scipy")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (it holds another run, or no run)."""


def runs_root() -> Path:
    """Where run directories go by default: ./runs, or $RL_MTL_RUNS (the Docker image's /runs)."""
    return Path(os.environ.get("RL_MTL_RUNS", "runs"))


def default_run_dir(root: Path, config_name: str, method: str, seed: int) -> Path:
    """ROOT/<config>/<method>/seed<seed>: the layout train, sweep and evaluate share."""
    return root / Path(config_name).stem / method / f"seed{seed}"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, fsync, then rename it
    over ``path``: a reader, or a run killed mid-write, only ever sees the old file or the
    complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


# -- provenance ------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the checkout the package runs from; in the Docker image, where there is
    no .git, the one recorded at build time (RL_MTL_GIT_COMMIT); None when unknown."""
    recorded = os.environ.get("RL_MTL_GIT_COMMIT")
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return recorded
    if out.returncode != 0:
        return recorded
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_metadata(cfg: Config, device: torch.device, deterministic: bool, compiled: bool, tasks: list[str],
                 population: list[int]) -> str:  # fmt: skip
    """``run.json``: what this run was made with. ``population``: the seeds trained together
    in its process (just its own when it trained alone)."""
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "tasks": tasks,
        "population": population,
        "device": device_description(device),
        "deterministic": deterministic,
        "compiled": compiled,  # train.compile as resolved for this device
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(record, indent=2) + "\n"
