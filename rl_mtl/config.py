"""Typed run configuration: YAML presets (``rl_mtl/configs/``), ``--set key=value`` overrides,
validation, and the seed lists of the command lines.

Every field has a default (the modern MT10 protocol); a YAML file or ``--set`` changes fields by
dotted name (``train.total_steps``, ``agent.hidden_sizes``, ``method_options.cagrad.c``).
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the key, the
problem and the valid choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .registry import ARCHITECTURES, METHODS, component, construct

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # inside the package: a wheel has them too
BENCHMARKS = ("MT10", "MT50", "MT1", "custom")
MAX_EPISODE_STEPS = 500  # Meta-World truncates every episode here (SawyerXYZEnv.max_path_length)
MAX_SEED = 2**32 - 1  # numpy's seeds (the goals' and the envs') are 32-bit
# train.compile's modes (runtime.resolve_compile says what each needs; README: Speed)
COMPILE_MODES = ("off", "passes", "whole", "graphs")
# Fields that hold options per method / architecture: overrides merge into them per name.
OPTION_TABLES = ("method_options", "architecture_options")
# Keys that say how a run is executed, not what it computes: the seeds of one comparison may
# differ in them, and a resumed run may change them.
EXECUTION_KEYS = ("device", "deterministic", "train.compile")
# What a resumed run may change besides those: its budget, and the learning rates (what one
# lowers after a divergence; the change is recorded in run.resumed-<step>.json).
RESUMABLE_KEYS = ("train.total_steps", "agent.actor_lr", "agent.critic_lr", "agent.temperature_lr", *EXECUTION_KEYS)


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: ``1e-4`` is a float (YAML 1.2), not the string YAML 1.1 makes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class EnvConfig:
    benchmark: str = "MT10"  # MT10 | MT50 | MT1 (tasks = [one name]) | custom (tasks = [names])
    tasks: list[str] = field(default_factory=list)
    one_hot: bool = True  # append the task one-hot to observations
    max_episode_steps: int = 500
    reward_version: str = "v2"  # v1 | v2
    vector_strategy: str = "sync"  # sync | async (one process per task)
    goal_mode: str = "random"  # random: a stored goal drawn per reset | fixed: one goal per task per run
    reward_normalization: bool = False  # divide rewards by a running std (EMA), per task
    reward_norm_rate: float = 0.001


@dataclass
class AgentConfig:
    architecture: str = "shared"  # registry.ARCHITECTURES: shared | multihead | independent | ...
    # Options per architecture (soft_modularization, care, moore: README), for the one in use.
    architecture_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    hidden_sizes: list[int] = field(default_factory=lambda: [400, 400, 400])
    init: str = "default"  # default (PyTorch's) | xavier (Xavier-uniform weights, zero biases)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    temperature_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    init_temperature: float = 1.0
    temperature: str = "per_task"  # per_task | shared
    target_entropy: float | None = None  # None: minus the action dimension
    log_std_min: float = -20.0
    log_std_max: float = 2.0


@dataclass
class TrainConfig:
    total_steps: int = 2_000_000  # vector steps: each advances every task's env once
    warmup_steps: int = 1500  # random-action vector steps before the first update
    batch_size_per_task: int = 128
    buffer_capacity_per_task: int = 100_000
    updates_per_step: int = 1
    eval_every: int = 100_000  # vector steps; 0 disables periodic evaluation (the final one stays)
    eval_episodes: int = 50  # per task; with goal_mode=random one per stored goal (at most 50 distinct)
    checkpoint_every: int = 50_000  # vector steps; rounded up to an episode boundary
    log_every: int = 1000
    max_nonfinite_updates: int = 100  # consecutive skipped updates before the run stops
    # Overlap the update with the environments' step (needs env.vector_strategy=async).
    # None: on exactly when the vector env is async.
    overlap_env: bool | None = None
    # How the update runs (README: Speed): off (eager) | passes (its three batched passes compiled)
    # | whole (the whole update one compiled graph) | graphs (that graph captured and replayed as a
    # CUDA graph; CUDA only). true means passes, false off. None: passes on the CPU when a C++
    # compiler is installed (measured to pay there), off on CUDA until measured on a GPU. A speed
    # switch: the numbers are the same up to floating-point summation order.
    compile: bool | str | None = None


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "nashmtl"
    # Options per method, passed to make_aggregator for the method in use.
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"cagrad": {"c": 0.9}, "fairgrad": {"alpha": 2.0}, "nashmtl": {}}
    )
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool | None = None  # None: on for CPU, off for CUDA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{path}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}"
                )
            _apply(current, value, prefix=f"{path}.")
        elif key in OPTION_TABLES:
            merged = {m: dict(o) for m, o in current.items()}
            for method, options in _coerce(path, value, dict[str, Any]).items():
                merged.setdefault(method, {}).update(_coerce(f"{path}.{method}", options, dict[str, Any]))
            setattr(obj, key, merged)
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of: {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Range and consistency checks that types alone cannot express."""
    env, agent, train = cfg.env, cfg.agent, cfg.train
    _choice("method", cfg.method, tuple(METHODS))
    _choice("env.benchmark", env.benchmark, BENCHMARKS)
    _choice("env.reward_version", env.reward_version, ("v1", "v2"))
    _choice("env.vector_strategy", env.vector_strategy, ("sync", "async"))
    _choice("env.goal_mode", env.goal_mode, ("random", "fixed"))
    _choice("agent.architecture", agent.architecture, tuple(ARCHITECTURES))
    _choice("agent.init", agent.init, ("default", "xavier"))
    _choice("agent.temperature", agent.temperature, ("per_task", "shared"))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in [0, {MAX_SEED}] (numpy's seeds are 32-bit), got {cfg.seed}")
    if env.max_episode_steps > MAX_EPISODE_STEPS:
        raise ConfigError(
            f"env.max_episode_steps={env.max_episode_steps}: Meta-World ends every episode at {MAX_EPISODE_STEPS} "
            "steps; choose at most that"
        )
    if env.benchmark == "MT1" and len(env.tasks) != 1:
        raise ConfigError("env.tasks: MT1 needs exactly one task name, e.g. --set env.tasks=[reach-v3]")
    if env.benchmark == "custom" and not env.tasks:
        raise ConfigError("env.tasks: the custom benchmark needs a list of task names, e.g. [reach-v3, push-v3]")
    if env.benchmark in ("MT10", "MT50") and env.tasks:
        raise ConfigError(f"env.tasks must be empty for {env.benchmark} (its task set is fixed); use benchmark custom")
    for key, value in [
        ("env.max_episode_steps", env.max_episode_steps),
        ("train.total_steps", train.total_steps),
        ("train.batch_size_per_task", train.batch_size_per_task),
        ("train.buffer_capacity_per_task", train.buffer_capacity_per_task),
        ("train.updates_per_step", train.updates_per_step),
        ("train.eval_episodes", train.eval_episodes),
        ("train.checkpoint_every", train.checkpoint_every),
        ("train.log_every", train.log_every),
        ("train.max_nonfinite_updates", train.max_nonfinite_updates),
        ("agent.actor_lr", agent.actor_lr),
        ("agent.critic_lr", agent.critic_lr),
        ("agent.temperature_lr", agent.temperature_lr),
        ("agent.init_temperature", agent.init_temperature),
        ("env.reward_norm_rate", env.reward_norm_rate),
    ]:
        _positive(key, value)
    _positive("train.warmup_steps", train.warmup_steps, allow_zero=True)
    _positive("train.eval_every", train.eval_every, allow_zero=True)
    if not agent.hidden_sizes or any(h <= 0 for h in agent.hidden_sizes):
        raise ConfigError(f"agent.hidden_sizes must be a non-empty list of positive sizes, got {agent.hidden_sizes}")
    if not 0 < agent.gamma < 1:
        raise ConfigError(f"agent.gamma must be in (0, 1), got {agent.gamma}")
    if not 0 < agent.tau <= 1:
        raise ConfigError(f"agent.tau must be in (0, 1], got {agent.tau}")
    if agent.log_std_min >= agent.log_std_max:
        raise ConfigError("agent.log_std_min must be below agent.log_std_max")
    if isinstance(train.compile, str):
        _choice("train.compile", train.compile, COMPILE_MODES)
    if train.overlap_env and env.vector_strategy != "async":
        raise ConfigError(
            "train.overlap_env=true needs env.vector_strategy=async (a sync env cannot step while the update runs)"
        )
    if train.batch_size_per_task > train.buffer_capacity_per_task:
        raise ConfigError("train.batch_size_per_task cannot exceed train.buffer_capacity_per_task")
    unknown = sorted(set(cfg.method_options) - set(METHODS))
    if unknown:
        raise ConfigError(f"method_options: unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    unknown = sorted(set(agent.architecture_options) - set(ARCHITECTURES))
    if unknown:
        raise ConfigError(
            f"agent.architecture_options: unknown architecture(s) {', '.join(unknown)}; choose from: "
            f"{', '.join(ARCHITECTURES)}"
        )
    _check_options(cfg)
    return cfg


def _check_options(cfg: Config) -> None:
    """Build and discard the method's aggregator and a small network of the architecture, through
    the registry, so that bad option names and values fail now (a context file's task names are
    checked when the run's network is built). This imports them, and torch; importing this module
    does not."""
    options = cfg.method_options.get(cfg.method, {})
    try:
        construct(component(METHODS, cfg.method), cfg.method, (), options, ValueError)
    except ValueError as err:
        raise ConfigError(f"method_options.{cfg.method}: {err}") from err
    agent = cfg.agent
    options = agent.architecture_options.get(agent.architecture, {})
    try:
        construct(component(ARCHITECTURES, agent.architecture), agent.architecture,
                  (3, 1, 2, ["a", "b"], agent.hidden_sizes, agent.init), options, ValueError)  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"agent.architecture_options.{agent.architecture}: {err}") from err


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a preset name from configs/ ('smoke' -> configs/smoke.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none found"
    raise ConfigError(f"config file '{name}' not found; pass a YAML path or a preset name ({presets})")


def parse_yaml(text: str) -> Any:
    """YAML as the configs are written (``1e-4`` a float); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def read_yaml_file(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (``what`` names it in errors): a missing, unreadable, binary,
    malformed or non-mapping file is a ConfigError saying which and what to do."""
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} '{path}' cannot be read ({type(err).__name__}: {err}); check the path") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'train.total_steps=1000' -> ('train.total_steps', 1000); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.total_steps=1000), got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}': {err}") from err
    return key.strip(), value


def nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_config_file(name: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's keys; a file that says ``extends: <preset or path>`` holds only its
    differences from that one (read first)."""
    path = resolve_config_path(name)
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' extends itself (through {' -> '.join(map(str, seen))})")
    data = read_yaml_file(path, "config file")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file '{path}': extends must name a preset or a file, got {base!r}")
    return merge(read_config_file(base, (*seen, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides <- explicit top-level values (method, seed...)."""
    cfg = Config()
    if path is not None:
        _apply(cfg, read_config_file(path))
    for text in overrides or []:
        _apply(cfg, nest(*parse_override(text)))
    _apply(cfg, {k: v for k, v in top.items() if v is not None})
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return validate(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'total_steps': 1}} -> {'train.total_steps': 1} (option tables stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in OPTION_TABLES:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (returns a new dict)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def diff_configs(saved: Config, requested: Config, allowed: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ (ignoring ``allowed`` ones)."""
    a, b = flatten(saved.to_dict()), flatten(requested.to_dict())
    return sorted(k for k in a if a[k] != b.get(k) and k not in allowed)


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5-7' -> the seeds, in order (the --seeds of train and sweep); argparse
    reports the ArgumentTypeError as bad input."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            lo, hi = int(first), int(last if dash else first)
            if hi < lo:
                raise ValueError
            seeds.extend(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed list {text!r}; write e.g. 0-9 or 0,3,5-7") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed list {text!r} names a seed twice")
    return seeds
