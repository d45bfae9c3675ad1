"""Checkpoints: one seed's complete training state, in a file whose reading can run no code.

A population's checkpoints are written as one set (``save_checkpoints``): each seed's previous
checkpoint stays until every seed has written its new one, so a kill at any instant leaves all
seeds resumable at one common step (``resume_points``).

The format (version 2) is a safetensors file: every tensor (networks, optimiser moments, replay,
generator states...) is a named tensor, and everything else (counters, the config, environment
and generator states as plain numbers) is JSON in the file's metadata, beside a SHA-256 digest
of all of it. Reading it parses JSON and copies tensor bytes, nothing else: no pickle. The
digest is checked on every load, so a file changed after it was written (a flipped bit, a
truncated copy, an edit) is refused. Writes are atomic (``run_dir.atomic_write``).

Version 1 (rl-mtl before the population update) was a pickle, which this version never opens:
``migrate`` names it and refuses it. A format change is one more step in ``migrate``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .run_dir import CheckpointError, atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"
PREVIOUS_NAME = "checkpoint.previous.safetensors"  # kept while a population's set is being written
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # format 1: a pickle
FORMAT_VERSION = 2
_MAGIC = "rl-mtl checkpoint"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, with its tensors (and numpy arrays) moved into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint keys must be strings (at {path or 'the top'})")
        return {"__dict__": {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} (at {path})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _digest(tree: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(tree.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (a tree of dicts with string keys, lists, tensors, numpy arrays and JSON
    numbers and strings) atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, "", tensors))
    metadata = {"format": _MAGIC, "format_version": str(FORMAT_VERSION), "tree": tree,
                "digest": _digest(tree, tensors)}  # fmt: skip
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def is_pickle(head: bytes) -> bool:
    """Whether a file's first bytes are torch.save's zip archive or a bare pickle (protocol 2-5).
    A safetensors file starts with its header's length (8 bytes, little-endian) and then "{": its
    first byte may be 0x80 too (a header of 128 + 256 n bytes), so that shape is checked first."""
    if len(head) >= 9 and head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _header(path: Path) -> dict[str, str]:
    """The file's metadata (its header only: cheap for a 400 MB checkpoint)."""
    from safetensors import safe_open

    with path.open("rb") as f:
        if is_pickle(f.read(9)):  # looked at, never unpickled
            migrate(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err}); restore it from a "
            "backup, or move the run directory aside and start the run again"
        ) from err
    return metadata


def _check_present(path: Path) -> None:
    if path.is_file():
        return
    legacy = path.with_name(LEGACY_CHECKPOINT_NAME)
    if legacy.is_file():
        migrate(legacy)
    if path.exists():
        raise CheckpointError(f"{path} is not a file; move it aside (it is not an rl-mtl checkpoint)")
    raise CheckpointError(f"no checkpoint at {path}: the run never reached its first checkpoint")


def migrate(path: Path) -> None:
    """Bring a checkpoint of an earlier format to the current one. Format 1 (``checkpoint.pt``,
    a pickle) is refused: opening it could run code, and the update it resumed is gone."""
    raise CheckpointError(
        f"{path} is a pickle: a checkpoint of format 1 (rl-mtl before the population update, 0.2) or a file of "
        "another program. This version never opens pickles (they can run code) and cannot continue format 1. "
        "Start the run again in a new directory, or finish it with the rl-mtl version that wrote it"
    )


def _verified(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    if metadata.get("format") != _MAGIC:
        raise CheckpointError(f"{path} is not an rl-mtl checkpoint (no rl-mtl header); check the path")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint format {version}; this rl-mtl reads format {FORMAT_VERSION}: use the rl-mtl "
            "version that wrote it"
        )
    return metadata


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The saved state, after its digest is checked."""
    from safetensors.torch import load_file

    _check_present(path)
    metadata = _verified(path, _header(path))
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err})") from err
    if _digest(metadata["tree"], tensors) != metadata["digest"]:
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check: its contents changed after it was written (a damaged "
            "disk or copy, or an edit). Restore it from a backup, or start the run again"
        )
    return _decode(json.loads(metadata["tree"]), tensors)


def read_step(path: Path) -> int:
    """The step a checkpoint was taken at, from its header alone (no tensor is read)."""
    _check_present(path)
    metadata = _verified(path, _header(path))
    return int(json.loads(metadata["tree"])["__dict__"]["step"])


# -- a population's checkpoints as one set ---------------------------------------------------------
def save_checkpoints(run_dirs: list[Path], state_of: Callable[[int], dict[str, Any]]) -> None:
    """Every seed's checkpoint (``state_of(s)`` for the seed in ``run_dirs[s]``), as one set:
    each seed's current checkpoint becomes its previous one before the new one is written, and
    the previous ones are deleted only once every seed has its new one."""
    for s, run_dir in enumerate(run_dirs):
        current = run_dir / CHECKPOINT_NAME
        if current.exists():
            os.replace(current, run_dir / PREVIOUS_NAME)
        save_checkpoint(current, state_of(s))
    for run_dir in run_dirs:
        (run_dir / PREVIOUS_NAME).unlink(missing_ok=True)


def saved_steps(run_dir: Path) -> dict[int, Path]:
    """The checkpoints ``run_dir`` holds, by step: its current one and, where a population was
    stopped while saving, its previous one (or only that, if the stop came mid-write)."""
    found = {}
    for name in (PREVIOUS_NAME, CHECKPOINT_NAME):  # the current one wins a tie
        path = run_dir / name
        if path.exists():
            found[read_step(path)] = path
    if not found and (run_dir / LEGACY_CHECKPOINT_NAME).exists():
        migrate(run_dir / LEGACY_CHECKPOINT_NAME)
    return found


def resume_points(run_dirs: list[Path]) -> tuple[int, list[Path]] | None:
    """The latest step at which every one of ``run_dirs`` has a checkpoint, and those files;
    None when one of them has none (the population was stopped before, or while, it wrote its
    first set: they all start again). Seeds trained together always have such a step."""
    saved = [saved_steps(run_dir) for run_dir in run_dirs]
    if not all(saved):
        return None
    common = set.intersection(*(set(steps) for steps in saved))
    if not common:
        listed = "; ".join(
            f"{d}: {', '.join(map(str, sorted(steps)))}" for d, steps in zip(run_dirs, saved, strict=True)
        )
        raise CheckpointError(
            f"these runs have no checkpoint at a common step ({listed}), so they cannot continue together; "
            "resume them in separate commands"
        )
    step = max(common)
    return step, [steps[step] for steps in saved]


def make_current(path: Path) -> Path:
    """Make the checkpoint at ``path`` its run directory's current one (a previous one replaces a
    current one that is ahead of it: a population resumed at the step all its seeds reached)."""
    current = path.with_name(CHECKPOINT_NAME)
    if path != current:
        os.replace(path, current)
    return current
