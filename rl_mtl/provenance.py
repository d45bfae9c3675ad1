"""What a run was made with: package versions, git commit, device, seed (``run.json``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .config import Config

RECORDED_PACKAGES = ("torch", "metaworld", "mujoco", "gymnasium", "numpy", "cvxpy", "clarabel", "scipy")


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


def run_metadata(cfg: Config, device: torch.device, deterministic: bool, compiled: bool, tasks: list[str]) -> str:
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "tasks": tasks,
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
