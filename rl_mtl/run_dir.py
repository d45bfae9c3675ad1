"""Run directories: where runs go, the files in them, atomic writes, and what a run was made with
(``run.json``: package versions, git commit, device, seed)."""

from __future__ import annotations

import errno
import fcntl
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

from .config import Config

CONFIG_NAME = "config.yaml"
RUN_INFO_NAME = "run.json"
LOCK_NAME = ".lock"
RECORDED_PACKAGES = ("torch", "metaworld", "mujoco", "gymnasium", "numpy", "cvxpy", "clarabel", "scipy")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (it holds another run, or no run)."""


class CheckpointError(RuntimeError):
    """A missing, truncated, corrupted or foreign checkpoint, with what to do about it (defined
    here, with the run directory's other files, so that readers of results need no torch)."""


def runs_root() -> Path:
    """Where run directories go by default: ./runs, or $RL_MTL_RUNS (the Docker image's /runs)."""
    return Path(os.environ.get("RL_MTL_RUNS", "runs"))


def default_run_dir(root: Path, config_name: str, method: str, seed: int) -> Path:
    """ROOT/<config>/<method>/seed<seed>: the layout train, sweep and evaluate share."""
    return root / Path(config_name).stem / method / f"seed{seed}"


# -- one writer per run directory ------------------------------------------------------------------
_held: dict[Path, int] = {}  # run directory -> the descriptor of its lock file, held by this process


def lock_run_dir(run_dir: Path) -> None:
    """Make this process the run directory's only writer (creating the directory): an exclusive
    ``flock`` on its lock file, which the kernel releases when the process ends however it ends,
    so a crashed run never blocks its own resume. A second writer is refused at once; readers
    (evaluate, plot) take no lock. Idempotent within a process."""
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError) as err:
        raise RunDirError(f"{run_dir} (or a folder above it) is a file, not a directory; choose another --run-dir") \
            from err  # fmt: skip
    except OSError as err:
        raise RunDirError(f"cannot create or write {run_dir} ({err.strerror}); choose a writable --run-dir") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"{run_dir} is being written by {holder}; wait for that run to end (or stop it) before training "
            "into this directory. Reading it (evaluate, plot, tensorboard) is fine meanwhile"
        ) from None
    os.ftruncate(fd, 0)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.pwrite(fd, f"pid {os.getpid()} on {platform.node()} (since {started})\n".encode(), 0)
    _held[key] = fd


def lock_holder(run_dir: Path) -> str | None:
    """Who writes ``run_dir`` now (its lock file's note), or None when no process holds its lock."""
    if run_dir.resolve() in _held:
        return f"this process (pid {os.getpid()})"
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
    return None


def unlock_run_dirs(run_dirs: list[Path]) -> None:
    for run_dir in run_dirs:
        fd = _held.pop(run_dir.resolve(), None)
        if fd is not None:
            os.close(fd)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of writes a killed process left behind (``atomic_write``'s
    ``.<name>.<random>.tmp``); call it holding the directory's lock."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def describe_write_error(err: OSError) -> str:
    """A one-line explanation and fix for a failed write in a run directory."""
    where = err.filename or "a run file"
    intact = "then resume the run (its last checkpoint is intact)"
    if err.errno == errno.ENOSPC:
        return f"the disk is full: could not write {where}. Free some space, {intact}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where} ({err.strerror}): make the directory writable, or choose another --run-dir"
    return f"could not write {where} ({err.strerror}); fix that, {intact}"


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


def run_metadata(cfg: Config, device: str, deterministic: bool, compile_mode: str, tasks: list[str],
                 population: list[int], network: dict[str, Any],
                 changed: dict[str, list[Any]] | None = None) -> str:  # fmt: skip
    """``run.json``: what this run was made with. ``population``: the seeds trained together
    in its process (just its own when it trained alone); ``network``: the architecture, its
    options and what it records (CARE's context); ``changed``: on a resume, the config keys it
    changed ([before, after]); ``device``: its description (``runtime.describe_device``)."""
    record: dict[str, Any] = {
        "seed": cfg.seed,
        "method": cfg.method,
        "tasks": tasks,
        "network": network,
        "population": population,
        "device": device,
        "deterministic": deterministic,
        "compile": compile_mode,  # train.compile as resolved for this device
        "changed_on_resume": changed or {},
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.dumps(record, indent=2) + "\n"
