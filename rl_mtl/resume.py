"""Which runs a command trains: new run directories, or resumed ones, and the checks that a
checkpoint resumes only the run that wrote it (its seed, method and config) and that runs trained
in one process belong together (one config up to the seed, one step)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, make_current, resume_points, saved_steps
from .config import (
    RESUMABLE_KEYS,
    Config,
    ConfigError,
    config_from_dict,
    diff_configs,
    flatten,
    load_config,
    merge,
    nest,
    parse_override,
    read_config_file,
    read_yaml_file,
)
from .envs import EnvError
from .metrics import METRICS_NAME
from .run_dir import (
    CONFIG_NAME,
    RUN_INFO_NAME,
    CheckpointError,
    RunDirError,
    default_run_dir,
    lock_run_dir,
    runs_root,
)

RunSpec = tuple[Config, Path, "dict[str, Any] | None"]  # (config, run directory, checkpoint to resume)


def new_runs(config_name: str, overrides: list[str], explicit: dict[str, Any], seeds: list[int],
             run_dir: Path | None, several: bool, lock: bool = True) -> list[RunSpec]:  # fmt: skip
    """New runs of ``seeds`` in ``run_dir`` (one seed alone) or in ``seed<seed>`` directories
    under it (``several``), by default under ROOT/<config>/<method>. With ``lock`` this process
    becomes each directory's only writer first, and then a directory that already holds a run is
    refused: never overwritten."""
    runs = []
    for seed in seeds:
        cfg = load_config(config_name, overrides, **{**explicit, "seed": seed})
        if run_dir is not None and not several:
            directory = run_dir
        elif run_dir is not None:
            directory = run_dir / f"seed{cfg.seed}"
        else:
            directory = default_run_dir(runs_root(), config_name, cfg.method, cfg.seed)
        if lock:
            lock_run_dir(directory)
        if resume_points([directory]) is not None:
            raise RunDirError(
                f"{directory} already holds a run; resume it with --resume {directory}, or choose another --run-dir"
            )
        if (directory / METRICS_NAME).exists():
            raise RunDirError(
                f"{directory} holds a run that never reached its first checkpoint; start it again with --resume "
                f"{directory} (its first attempt's logs are kept aside), or choose another --run-dir"
            )
        runs.append((cfg, directory, None))
    return runs


def resumed_runs(run_dirs: list[Path], config_name: str | None, overrides: list[str], explicit: dict[str, Any],
                 lock: bool = True) -> list[RunSpec]:  # fmt: skip
    """The runs in ``run_dirs``, each with its saved config (plus the changes a resume may make,
    ``config.RESUMABLE_KEYS``), continued together from the latest step at which all of them
    have a checkpoint. Runs that never reached a checkpoint start again from step 0 with their
    saved configs, their first attempt's logs moved aside. With ``lock`` this process becomes
    each directory's only writer first."""
    for run_dir in run_dirs:
        if not (run_dir / CONFIG_NAME).is_file():  # checked before locking, which would create the directory
            raise RunDirError(f"{run_dir} is not a run directory (no {CONFIG_NAME}); check the path")
        if lock:
            lock_run_dir(run_dir)
    configs = [_resumed_config(run_dir, config_name, overrides, explicit) for run_dir in run_dirs]
    points = resume_points(run_dirs)
    if points is None and any(saved_steps(d) for d in run_dirs) and not _trained_together(run_dirs):
        saved = ", ".join(str(d) for d in run_dirs if saved_steps(d))
        raise RunDirError(f"{saved} have checkpoints and the other runs none, and they were not trained together; "
                          "resume them in separate commands")  # fmt: skip
    if points is None:  # none has a checkpoint, or a population was stopped while writing its first set
        if lock:
            for run_dir in run_dirs:
                _set_aside_first_attempt(run_dir)
        return [(cfg, run_dir, None) for cfg, run_dir in zip(configs, run_dirs, strict=True)]
    step, paths = points
    runs = []
    for cfg, run_dir, path in zip(configs, run_dirs, paths, strict=True):
        if step >= cfg.train.total_steps:
            raise RunDirError(f"{run_dir} is already complete ({step} of {cfg.train.total_steps} steps); extend it "
                              "with --set train.total_steps=N")  # fmt: skip
        state = load_checkpoint(make_current(path) if lock else path)
        _check_identity(run_dir, cfg, state)
        runs.append((cfg, run_dir, state))
    return runs


def _resumed_config(run_dir: Path, config_name: str | None, overrides: list[str], explicit: dict[str, Any]) -> Config:
    saved = config_from_dict(read_yaml_file(run_dir / CONFIG_NAME, "the run's config"))
    data = saved.to_dict()
    if config_name:
        data = config_from_dict(merge(data, read_config_file(config_name))).to_dict()
    for text in overrides:
        data = merge(data, nest(*parse_override(text)))
    requested = config_from_dict(merge(data, {k: v for k, v in explicit.items() if v is not None}))
    conflicts = diff_configs(saved, requested, allowed=RESUMABLE_KEYS)
    if conflicts:
        saved_flat, req_flat = flatten(saved.to_dict()), flatten(requested.to_dict())
        details = "; ".join(f"{k}: saved {saved_flat.get(k)!r}, requested {req_flat.get(k)!r}" for k in conflicts)
        raise ConfigError(
            f"cannot resume {run_dir} with a different config ({details}). A resume may change only "
            f"{', '.join(RESUMABLE_KEYS)}; drop the other options, or start a new run in another --run-dir"
        )
    return requested


def _check_identity(run_dir: Path, cfg: Config, state: dict[str, Any]) -> None:
    """A checkpoint resumes only the run that wrote it: same seed, method and config (up to what a
    resume may change)."""
    where = run_dir / CHECKPOINT_NAME
    for field, mine in (("seed", cfg.seed), ("method", cfg.method)):
        if state.get(field) != mine:
            raise CheckpointError(
                f"{where} belongs to another run: its {field} is {state.get(field)!r}, this run directory's is "
                f"{mine!r}. Put this run's own checkpoint back, or start the run again in a new directory"
            )
    try:
        theirs = config_from_dict(state["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where} holds no valid config ({err}); it was not written by this rl-mtl") from err
    differing = diff_configs(theirs, cfg, allowed=RESUMABLE_KEYS)
    if differing:
        raise CheckpointError(
            f"{where} belongs to another run: its config differs from {run_dir / CONFIG_NAME} in "
            f"{', '.join(differing)}. Put this run's own checkpoint back, or start the run again in a new directory"
        )


def _trained_together(run_dirs: list[Path]) -> bool:
    """Whether ``run_dirs`` are the whole population one process trained (their run.json)."""
    try:
        infos = [json.loads((d / RUN_INFO_NAME).read_text()) for d in run_dirs]
        return all(sorted(i["population"]) == sorted(x["seed"] for x in infos) for i in infos)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _set_aside_first_attempt(run_dir: Path) -> None:
    """Move a run's logs that never reached a checkpoint into ``aborted-<time>/``."""
    aside = run_dir / f"aborted-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = [run_dir / name for name in (METRICS_NAME, "tensorboard", RUN_INFO_NAME)] + list(
        run_dir.glob("run.resumed-*")
    )
    for path in logs:
        if path.exists():
            aside.mkdir(exist_ok=True)
            os.replace(path, aside / path.name)
    print(f"{run_dir} never reached its first checkpoint: starting it again from step 0 with its saved config"
          + (f" (the first attempt's logs are in {aside})" if aside.exists() else ""), file=sys.stderr)  # fmt: skip


def check_trainable_together(runs: list[RunSpec]) -> None:
    """Runs trained in one process step together: one config up to the seed, one step count."""
    (first, first_dir, first_state), others = runs[0], runs[1:]
    seen = {first.seed: first_dir}
    for cfg, run_dir, state in others:
        if cfg.seed in seen:
            raise ConfigError(f"{seen[cfg.seed]} and {run_dir} are both seed {cfg.seed}; resume them separately")
        seen[cfg.seed] = run_dir
        differing = diff_configs(first, cfg, allowed=("seed",))
        if differing:
            raise ConfigError(
                f"{first_dir} and {run_dir} differ in {', '.join(differing)}; only seeds of one config train "
                "together. Resume them in separate commands"
            )
        steps = (None if first_state is None else first_state["step"], None if state is None else state["step"])
        if steps[0] != steps[1]:
            raise ConfigError(
                f"{first_dir} is at step {steps[0]} and {run_dir} at step {steps[1]}; seeds train together only "
                "from the same step. Resume them in separate commands"
            )


@contextlib.contextmanager
def refuse_unfitting(where: Path, state: dict[str, Any]) -> Iterator[None]:
    """A field of the checkpoint ``state`` (in ``where``) that is missing or of the wrong kind
    becomes a CheckpointError naming it and the rl-mtl version that wrote the checkpoint."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, EnvError) as err:
        problem = f"it lacks the field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        writer = state.get("written_by")
        by = f"rl-mtl {writer}" if isinstance(writer, str) else "an rl-mtl that did not record its version"
        raise CheckpointError(
            f"the checkpoint in {where} does not fit this run ({problem}); it was written by {by}, this is rl-mtl "
            f"{__version__}, or by another configuration: resume it with the version that wrote it, or start a new run"
        ) from err
