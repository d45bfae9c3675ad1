"""``python -m rl_mtl.train``: multi-task SAC on Meta-World with gradient aggregation.

The loop reads top to bottom: act, step the envs, store, update, log, evaluate, checkpoint.
Checkpoints are taken at episode boundaries (all tasks' episodes end together: fixed length,
no termination), before the next goals are drawn, so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .agents import MultiTaskSAC, NonFiniteLossError
from .aggregators import make_aggregator
from .buffers import MultiTaskReplayBuffer
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from .config import (
    METHODS,
    Config,
    ConfigError,
    config_from_dict,
    diff_configs,
    flatten,
    load_config,
    merge,
    nest,
    parse_override,
    resolve_config_path,
)
from .envs import EnvError, RewardNormalizer, VectorEnvRunner, make_vector_env, run_evaluation, task_names
from .logging import METRICS_NAME, RunLogger, truncate_metrics
from .provenance import run_metadata

# Keys a resumed run may change: extending the budget, or moving to another device.
RESUMABLE_CHANGES = ("train.total_steps", "device", "deterministic", "train.compile")
EXIT_INTERRUPTED = 130


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (it holds another run, or no run)."""


# ---------------------------------------------------------------------------------------------
# Devices, determinism, seeds
# ---------------------------------------------------------------------------------------------
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


def resolve_compile(cfg: Config, device: torch.device) -> bool:
    """train.compile: None means on for the CPU (measured to pay, README: Speed) when a compiler is
    installed, off on CUDA (not yet measured)."""
    if cfg.train.compile is None:
        return device.type == "cpu" and compiler_available(device)
    if cfg.train.compile and not compiler_available(device):
        needed = "a C compiler (gcc) for Triton" if device.type == "cuda" else "a C++ compiler (g++)"
        raise ConfigError(f"train.compile=true needs {needed} on PATH; install one or set train.compile=false")
    return cfg.train.compile


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # network initialisation (and CUDA's generators)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Metric accumulation between log points (device tensors, read once per log)
# ---------------------------------------------------------------------------------------------
@dataclass
class MetricSums:
    """Sums of the applied updates' metrics since the last log, on the device. A skipped update
    (``applied`` False) adds zeros, so the interval's means cover the applied updates only."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    updates: torch.Tensor | int = 0  # applied updates (a device tensor once one is added)
    latest: dict[str, torch.Tensor] = field(default_factory=dict)  # diagnostics: last value only (nan: skipped)

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        applied = metrics["applied"]
        for name, value in metrics.items():
            if name == "applied":
                continue
            if name.endswith("min_cosine"):
                self.latest[name] = torch.where(applied, value.detach(), torch.nan)
            else:
                value = torch.where(applied, value.detach(), 0.0)  # where, not *: a skipped value may be nan
                self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.updates = self.updates + applied.to(torch.int64)

    def count(self) -> int:
        """Applied updates since the last reset (reading it synchronises with the device)."""
        return int(self.updates)

    def means(self) -> dict[str, np.ndarray]:
        n = max(self.count(), 1)
        out = {k: (v / n).cpu().numpy() for k, v in self.sums.items()}
        out.update({k: v.cpu().numpy() for k, v in self.latest.items()})
        return out

    def reset(self) -> None:
        self.sums, self.updates, self.latest = {}, 0, {}


def per_task(prefix: str, values: np.ndarray, tasks: list[str]) -> dict[str, float]:
    return {f"{prefix}/{task}": float(v) for task, v in zip(tasks, values, strict=True)}


def collect_and_learn(driver: Any, learns: bool, diagnostics: bool) -> Any:
    """One collection step of ``driver`` (a ``Trainer`` or a ``SeedBatch``) and, when ``learns``,
    its update(s); returns what its ``collect_step`` returns. When the driver overlaps, the update
    runs while the envs step and samples the transitions stored so far: the newest transition
    joins the replay one update later than without overlap."""
    if learns and driver.overlap:
        return driver.collect_step(lambda: driver.learn(diagnostics))
    outcome = driver.collect_step()
    if learns:
        driver.learn(diagnostics)
    return outcome


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Everything one run owns. ``state_dict`` / ``load_state_dict`` cover all of it."""

    def __init__(
        self, cfg: Config, run_dir: Path, progress: bool = True, env: Any = None, eval_env: Any = None
    ) -> None:
        """``env`` / ``eval_env``: prebuilt vector envs (the benchmark shares one between methods)."""
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.device = resolve_device(cfg.device)
        self.deterministic = set_determinism(cfg, self.device)
        seed_everything(cfg.seed)
        self.tasks = task_names(cfg.env)
        self.num_tasks = len(self.tasks)
        self.env = env if env is not None else make_vector_env(cfg.env, cfg.seed)
        self.eval_env = eval_env if eval_env is not None else make_vector_env(cfg.env, cfg.seed, evaluation=True)
        self.runner = VectorEnvRunner(self.env, self.num_tasks)
        # Overlap the update with the env step where the env can (validated in config).
        overlap = cfg.train.overlap_env
        self.overlap = self.runner.can_overlap if overlap is None else overlap
        obs_dim = self.env.single_observation_space.shape[0]
        self.action_dim = self.env.single_action_space.shape[0]
        self.compiled = resolve_compile(cfg, self.device)
        self.agent = MultiTaskSAC(
            obs_dim, self.action_dim, self.num_tasks, cfg.agent, self.device, seed=cfg.seed, compile=self.compiled
        )
        t = cfg.train
        self.buffer = MultiTaskReplayBuffer(
            self.num_tasks, t.buffer_capacity_per_task, obs_dim, self.action_dim, self.device, seed=cfg.seed + 1
        )
        options = dict(cfg.method_options.get(cfg.method, {}))
        self.critic_aggregator = make_aggregator(cfg.method, **self._seeded(options, 1))
        self.actor_aggregator = make_aggregator(cfg.method, **self._seeded(options, 2))
        self.normalizer = (
            RewardNormalizer(self.num_tasks, cfg.env.reward_norm_rate) if cfg.env.reward_normalization else None
        )
        self.warmup_rng = np.random.default_rng(cfg.seed + 3)  # random actions before learning
        self.step = 0
        self.last_checkpoint_step = 0
        self.last_eval_step = -1
        self.sums = MetricSums()
        self.obs = self.runner.reset_all()
        self._obs_on_device: tuple[Any, torch.Tensor | None] = (None, None)  # (host array, its device copy)
        self.stop_requested = False
        self.at_boundary = True  # every task's episode has just ended (set before each save)

    def _seeded(self, options: dict[str, Any], stream: int) -> dict[str, Any]:
        if self.cfg.method == "pcgrad" and "seed" not in options:
            options = {**options, "seed": self.cfg.seed * 1000 + stream}
        return options

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "last_eval_step": self.last_eval_step,
            "at_boundary": self.at_boundary,
            "config": self.cfg.to_dict(),
            "agent": self.agent.training_state(),
            "buffer": self.buffer.state_dict(),
            "critic_aggregator": self.critic_aggregator.state_dict(),
            "actor_aggregator": self.actor_aggregator.state_dict(),
            "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
            "warmup_rng": self.warmup_rng.bit_generator.state,
            "rng": rng_state(),
            "env": self.runner.checkpoint(),
            "eval_env": list(self.eval_env.call("get_checkpoint")),
            "metric_sums": {"sums": {k: v.cpu() for k, v in self.sums.sums.items()}, "updates": self.sums.count()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.last_checkpoint_step = int(state["step"])
        self.last_eval_step = int(state["last_eval_step"])
        self.agent.load_training_state(state["agent"])
        self.buffer.load_state_dict(state["buffer"])
        self.critic_aggregator.load_state_dict(state["critic_aggregator"])
        self.actor_aggregator.load_state_dict(state["actor_aggregator"])
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])
        self.warmup_rng.bit_generator.state = state["warmup_rng"]
        set_rng_state(state["rng"])
        self.runner.load_checkpoint(state["env"])
        self.eval_env.call("load_checkpoint", state["eval_env"])
        sums = state["metric_sums"]
        self.sums = MetricSums({k: v.to(self.device) for k, v in sums["sums"].items()}, int(sums["updates"]))
        # The checkpoint was taken before the finished episodes' reset: do that reset now, with
        # the restored env RNGs, exactly as the uninterrupted run did right after saving.
        if not state["at_boundary"]:
            print(
                "warning: this checkpoint was taken mid-episode (the end of a run whose length is not a "
                "multiple of the episode length); episodes restart, so the continuation is not bit-identical "
                "to an uninterrupted run",
                file=sys.stderr,
            )
        self.obs = self.runner.reset_all()

    # -- one step of the loop (``train_together`` strings them together) ------------------------
    def train(self, logger: RunLogger, stop_at_step: int | None = None) -> int:
        """Train up to ``train.total_steps``. Returns 0, or EXIT_INTERRUPTED after a signal.
        ``stop_at_step`` (tests): abort at that step without saving, like ``kill -9``."""
        return train_together(self, [self], [logger], self.progress, stop_at_step)

    def plan_step(self) -> tuple[bool, bool]:
        """(whether this step ends with an update, whether that update logs diagnostics)."""
        t = self.cfg.train
        return self.step + 1 > t.warmup_steps, (self.step + 1) % t.log_every == 0

    def advance(self, learns: bool, diagnostics: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """One collection step and, after the warm-up, one update: [(terminated, truncated)]."""
        return [collect_and_learn(self, learns, diagnostics)]

    def collect_step(self, while_stepping: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Act (random during warm-up), step every task's env, store the transitions.

        ``while_stepping`` runs after the actions are sent and before the results are read: with
        an async vector env the update overlaps the environments' step.
        """
        # The observation is usually last step's next observation, already on the device.
        cached_obs, cached_obs_t = self._obs_on_device
        obs_t = cached_obs_t if cached_obs is self.obs else self.to_device(self.obs)
        if self.warming_up:
            action = self.warmup_action()
            action_t = self.to_device(action)
        else:
            action_t = self.agent.act(obs_t)
            action = action_t.cpu().numpy().astype(np.float64)
        self.runner.step_async(action)
        if while_stepping is not None:
            while_stepping()
        packed, terminated, truncated = self.receive()
        packed_t = self.to_device(packed)  # one host-to-device copy for the whole transition
        next_obs_t = packed_t[:, :-2]
        self.buffer.add(obs_t, action_t, packed_t[:, -2], next_obs_t, packed_t[:, -1])
        self._obs_on_device = (self.runner.obs, next_obs_t)
        self.step += 1
        return terminated, truncated

    @property
    def warming_up(self) -> bool:
        return self.step < self.cfg.train.warmup_steps

    def warmup_action(self) -> np.ndarray:
        """Uniform random actions [K, A] from this run's own warm-up generator."""
        return self.warmup_rng.uniform(-1.0, 1.0, (self.num_tasks, self.action_dim))

    def receive(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Finish the env step: the transition packed as [K, obs_dim + 2] (next observation,
        normalised reward, terminated), and the ``terminated`` / ``truncated`` flags."""
        next_obs, reward, terminated, truncated = self.runner.step_wait()
        if self.normalizer is not None:
            reward = self.normalizer(reward)
        packed = np.concatenate([next_obs, reward[:, None], terminated[:, None]], axis=1)
        return packed, terminated, truncated

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """A float32 copy of env data on the training device (a seed batch uses its lead's)."""
        return torch.as_tensor(array, dtype=torch.float32, device=self.device)

    def learn(self, diagnostics: bool) -> None:
        t = self.cfg.train
        for i in range(t.updates_per_step):
            batch = self.buffer.sample(t.batch_size_per_task)
            last = i == t.updates_per_step - 1
            self.sums.add(self.agent.update(batch, self.critic_aggregator, self.actor_aggregator, diagnostics and last))

    def logs_or_saves(self, terminated: np.ndarray, truncated: np.ndarray) -> bool:
        """Whether ``finish_step`` may log or save after this step (a checkpoint needs an
        episode end, or the last step)."""
        t = self.cfg.train
        return self.step % t.log_every == 0 or bool((terminated | truncated).any()) or self.step == t.total_steps

    def check_skipped_updates(self) -> None:
        """Stop once ``train.max_nonfinite_updates`` updates in a row were skipped. The counters
        live on the device, so the loop reads them only where a run may log or save (log steps,
        episode ends), not after every update: the run stops at the first of those points after
        the limit (skipped updates change nothing, so the extra ones are harmless), and never
        saves a checkpoint past it."""
        longest = self.agent.longest_nonfinite_streak
        if longest >= self.cfg.train.max_nonfinite_updates:
            raise NonFiniteLossError(
                f"{self.run_dir}: {longest} consecutive updates had non-finite losses or gradients (limit "
                f"train.max_nonfinite_updates={self.cfg.train.max_nonfinite_updates}, seen at step {self.step}); "
                f"stopping. The last checkpoint (step {self.last_checkpoint_step}) is intact: resume from it with "
                f"smaller learning rates (--set agent.critic_lr=1e-4) or check the reward scale "
                f"(--set env.reward_normalization=true)"
            )

    def start_interval(self) -> None:
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def finish_step(
        self,
        logger: RunLogger,
        terminated: np.ndarray,
        truncated: np.ndarray,
        bar: Any,
        evaluation: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> int | None:
        """Log, evaluate, checkpoint and reset finished episodes after a collection step.
        ``evaluation``: this step's (success, return) per task when the loop evaluated (see
        ``eval_due``). Returns EXIT_INTERRUPTED when a requested stop has been saved."""
        t = self.cfg.train
        self.interval_steps += 1
        if self.step % t.log_every == 0:
            rate = self.interval_steps / max(time.perf_counter() - self.interval_start, 1e-9)
            self._log_training(logger, rate)
            bar.set_postfix_str(f"{rate:.1f} steps/s", refresh=False)
            self.start_interval()

        done = terminated | truncated
        final = self.step == t.total_steps
        if evaluation is not None:
            success = self.log_evaluation(logger, *evaluation)
            bar.set_postfix_str(f"eval success {success:.2f}", refresh=False)
        if done.any():
            finished = self.runner.finished_stats(done)
            self._log_episodes(logger, finished)
            boundary = bool(done.all())
            due = self.step - self.last_checkpoint_step >= t.checkpoint_every
            if (boundary and (due or self.stop_requested)) or final:
                self.at_boundary = boundary
                self._save(logger)
            if self.stop_requested and boundary and not final:
                return EXIT_INTERRUPTED
            if not final:
                self.runner.reset_finished(done)
        elif final:
            self.at_boundary = False
            self._save(logger)
        self.obs = self.runner.obs
        return None

    def _log_training(self, logger: RunLogger, steps_per_second: float) -> None:
        scalars: dict[str, float] = {"perf/steps_per_second": steps_per_second, "buffer/size": float(len(self.buffer))}
        if self.sums.count():
            means = self.sums.means()
            for key, tag in [
                ("critic_loss", "loss/critic"),
                ("actor_loss", "loss/actor"),
                ("temperature", "temperature"),
                ("entropy", "entropy"),
                ("critic_weights", "weights/critic"),
                ("actor_weights", "weights/actor"),
            ]:
                scalars.update(per_task(tag, means[key], self.tasks))
            scalars["loss/critic_mean"] = float(means["critic_loss"].mean())
            scalars["loss/actor_mean"] = float(means["actor_loss"].mean())
            for name in ("critic", "actor"):
                cosine = means.get(f"{name}_min_cosine")
                if cosine is not None and np.isfinite(cosine):  # nan: the diagnostic update was skipped, or K = 1
                    scalars[f"grad/min_cosine_{name}"] = float(cosine)
        scalars["aggregator/fallbacks_critic"] = float(self.critic_aggregator.fallbacks)
        scalars["aggregator/fallbacks_actor"] = float(self.actor_aggregator.fallbacks)
        scalars["train/nonfinite_updates"] = float(self.agent.nonfinite_total)
        logger.log(self.step, scalars, kind="train")
        self.sums.reset()

    def _log_episodes(self, logger: RunLogger, finished: dict[str, np.ndarray]) -> None:
        names = [self.tasks[i] for i in finished["task"]]
        scalars = per_task("episode/return", finished["return"], names)
        scalars.update(per_task("episode/success", finished["success"], names))
        if len(names) == self.num_tasks:
            scalars["episode/return_mean"] = float(finished["return"].mean())
            scalars["episode/success_mean"] = float(finished["success"].mean())
        logger.log(self.step, scalars, kind="episode")

    def evaluate(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The deterministic policy on the eval env: [(success, return) per task]. (A SeedBatch
        evaluates all its seeds at once and returns one pair per seed.)"""

        def policy(obs: np.ndarray) -> np.ndarray:
            return self.agent.act(self.to_device(obs), deterministic=True).cpu().numpy().astype(np.float64)

        return [run_evaluation(self.eval_env, policy, self.cfg.train.eval_episodes, self.cfg.env.max_episode_steps)]

    def eval_due(self) -> bool:
        t = self.cfg.train
        due = (t.eval_every and self.step % t.eval_every == 0) or self.step == t.total_steps
        return bool(due) and self.last_eval_step != self.step

    def log_evaluation(self, logger: RunLogger, success: np.ndarray, returns: np.ndarray) -> float:
        """Log an evaluation of this step (per-task success and return); the mean success."""
        scalars = per_task("eval/success", success, self.tasks)
        scalars.update(per_task("eval/return", returns, self.tasks))
        scalars["eval/success_mean"] = float(success.mean())
        scalars["eval/return_mean"] = float(returns.mean())
        scalars["eval/episodes_per_task"] = float(self.cfg.train.eval_episodes)
        logger.log(self.step, scalars, kind="eval")
        self.last_eval_step = self.step
        return float(success.mean())

    def _save(self, logger: RunLogger) -> None:
        logger.flush()
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.state_dict())
        self.last_checkpoint_step = self.step

    def close(self) -> None:
        self.env.close()
        self.eval_env.close()


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not enabled,
        smoothing=0.05,
    )


def train_together(
    driver: Any, trainers: list[Trainer], loggers: list[RunLogger], progress: bool, stop_at_step: int | None = None
) -> int:
    """The training loop, for one run (``driver`` is its Trainer) or several seeds trained
    together (``driver`` is a ``SeedBatch``); every run logs, evaluates and checkpoints itself."""
    lead = trainers[0]
    total = lead.cfg.train.total_steps
    bar = _progress_bar(total, lead.step, progress)
    for trainer in trainers:
        trainer.start_interval()
    try:
        while lead.step < total:
            outcomes = driver.advance(*lead.plan_step())
            bar.update(1)
            if stop_at_step is not None and lead.step > stop_at_step:
                return EXIT_INTERRUPTED
            # Every run's streak of skipped updates, before any of them logs or saves: seeds
            # trained together then stop with checkpoints of one step, resumable together.
            if any(trainer.logs_or_saves(*outcome) for trainer, outcome in zip(trainers, outcomes, strict=True)):
                for trainer in trainers:
                    trainer.check_skipped_updates()
            # Seeds trained together are evaluated together (their eval envs in lockstep).
            evaluations = driver.evaluate() if lead.eval_due() else [None] * len(trainers)
            statuses = [
                trainer.finish_step(logger, terminated, truncated, bar, evaluation)
                for trainer, logger, (terminated, truncated), evaluation in zip(
                    trainers, loggers, outcomes, evaluations, strict=True
                )
            ]
            if EXIT_INTERRUPTED in statuses:
                bar.close()
                dirs = " ".join(str(t.run_dir) for t in trainers)
                print(f"\nstopped at step {lead.step}; checkpoint saved. Resume with: "
                      f"python -m rl_mtl.train --resume {dirs}", file=sys.stderr)  # fmt: skip
                return EXIT_INTERRUPTED
    finally:
        bar.close()
        for logger in loggers:
            logger.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rl_mtl.train",
        description="Train multi-task SAC on Meta-World (MT10 by default), combining per-task gradients "
        "with a gradient-aggregation method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m rl_mtl.train --method nashmtl                 # the full MT10 protocol\n"
        "  python -m rl_mtl.train --config smoke --method pcgrad   # a one-minute smoke run\n"
        "  python -m rl_mtl.train --config mt10-paper --method cagrad --seed 3\n"
        "  python -m rl_mtl.train --set env.benchmark=MT1 --set env.tasks=[reach-v3]\n"
        "  python -m rl_mtl.train --method fairgrad --seeds 0-9    # ten seeds together, one process\n"
        "  python -m rl_mtl.train --resume runs/mt10/nashmtl/seed0\n"
        "  python -m rl_mtl.train --resume runs/mt10/nashmtl/seed*  # continue seeds together\n"
        "Ctrl-C (or SIGTERM) finishes the current episode, saves a checkpoint and exits;\n"
        "a second Ctrl-C exits at once, keeping the previous checkpoint.",
    )
    parser.add_argument("--method", choices=METHODS, help="gradient aggregation method (default: nashmtl)")
    parser.add_argument("--config", help="YAML config file or preset name in configs/ (default: mt10)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="random seed (default: 0)")
    seeds.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar="LIST",
        help="train several seeds together in this process, e.g. 0-9 or 0,3,5-7; each seed gets its own "
        "run directory (README: Several seeds in one process)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default: auto)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run directory (default: $RL_MTL_RUNS or runs, then /<config>/<method>/seed<seed>); with --seeds, "
        "the parent of one seed<seed> directory per seed",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint; several RUN_DIRs (seeds of one config, at the "
        "same step) continue together in this process",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.total_steps=100000 (repeatable)",
    )
    det = parser.add_mutually_exclusive_group()
    det.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (default on CPU; slower on CUDA)",
    )
    det.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5-7' -> the seeds, in order; argparse reports a ValueError as bad input."""
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


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    return {"method": args.method, "seed": args.seed, "device": args.device, "deterministic": args.deterministic}


RunSpec = tuple[Config, Path, "dict[str, Any] | None"]  # (config, run directory, checkpoint to resume)


def resolve_runs(args: argparse.Namespace) -> list[RunSpec]:
    """The runs to train: one, several seeds (--seeds), or several resumed run directories."""
    if args.resume is not None:
        if args.seeds is not None:
            raise ConfigError("--seeds starts new runs; to continue seeds together pass their directories to --resume")
        runs = [resolve_resume(args, run_dir) for run_dir in args.resume]
        check_trainable_together(runs)
        return runs
    config_name = args.config or "mt10"
    seeds = args.seeds if args.seeds is not None else [args.seed]
    runs = []
    for seed in seeds:
        cfg = load_config(config_name, args.overrides, **{**_explicit(args), "seed": seed})
        if args.run_dir is not None and args.seeds is None:
            run_dir = args.run_dir
        else:
            run_dir = (args.run_dir or runs_root() / Path(config_name).stem / cfg.method) / f"seed{cfg.seed}"
        if (run_dir / CHECKPOINT_NAME).exists() or (run_dir / METRICS_NAME).exists():
            raise RunDirError(
                f"run directory {run_dir} already holds a run; resume it with --resume {run_dir}, "
                "or choose another --run-dir"
            )
        runs.append((cfg, run_dir, None))
    return runs


def resolve_resume(args: argparse.Namespace, run_dir: Path) -> RunSpec:
    """The saved config (with the allowed changes applied) and the checkpoint of ``run_dir``."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml); check the path")
    saved = config_from_dict(yaml.safe_load(saved_path.read_text()))
    data = saved.to_dict()
    if args.config:
        file_data = yaml.safe_load(resolve_config_path(args.config).read_text()) or {}
        requested = config_from_dict(merge(data, file_data))
        data = requested.to_dict()
    for text in args.overrides:
        data = merge(data, nest(*parse_override(text)))
    data = merge(data, {k: v for k, v in _explicit(args).items() if v is not None})
    requested = config_from_dict(data)
    conflicts = diff_configs(saved, requested, allowed=RESUMABLE_CHANGES)
    if conflicts:
        saved_flat, req_flat = flatten(saved.to_dict()), flatten(requested.to_dict())
        details = "; ".join(f"{k}: saved {saved_flat.get(k)!r}, requested {req_flat.get(k)!r}" for k in conflicts)
        raise ConfigError(
            f"cannot resume {run_dir} with a different config ({details}). Drop those options to "
            f"resume as saved, or start a new run in another --run-dir"
        )
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if state["step"] >= requested.train.total_steps:
        raise RunDirError(
            f"{run_dir} is already complete ({state['step']} of {requested.train.total_steps} steps); "
            "extend it with --set train.total_steps=N"
        )
    return requested, run_dir, state


def check_trainable_together(runs: list[RunSpec]) -> None:
    """Runs trained in one process step together: one config up to the seed, one step count."""
    if len(runs) < 2:
        return
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


def runs_root() -> Path:
    """Where run directories go by default: ./runs, or $RL_MTL_RUNS (the Docker image's /runs)."""
    return Path(os.environ.get("RL_MTL_RUNS", "runs"))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(
    cfg: Config,
    run_dir: Path,
    state: dict[str, Any] | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> int:
    """Train one run in ``run_dir`` (new, or resumed from ``state``)."""
    return run_together([(cfg, run_dir, state)], progress, stop_at_step)


def run_together(runs: list[RunSpec], progress: bool = True, stop_at_step: int | None = None) -> int:
    """Train one run, or several seeds of one config together (``SeedBatch``), each in its own
    run directory (new, or resumed from its checkpoint)."""
    check_trainable_together(runs)
    trainers: list[Trainer] = []
    loggers: list[RunLogger] = []
    try:
        for cfg, run_dir, state in runs:
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer = Trainer(cfg, run_dir, progress=progress)
            trainers.append(trainer)
            if state is not None:
                trainer.load_state_dict(state)
                truncate_metrics(run_dir / METRICS_NAME, trainer.step)
            write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            metadata = run_metadata(cfg, trainer.device, trainer.deterministic, trainer.compiled, trainer.tasks)
            write_text_atomic(run_dir / ("run.json" if state is None else f"run.resumed-{trainer.step}.json"), metadata)
            loggers.append(RunLogger(run_dir, purge_step=trainer.step + 1 if state is not None else None))
        if len(trainers) == 1:
            driver: Any = trainers[0]
        else:
            from .seed_batch import SeedBatch  # imports this module

            driver = SeedBatch(trainers)
        previous = _install_signal_handlers(trainers)
        try:
            return train_together(driver, trainers, loggers, progress, stop_at_step)
        finally:
            _restore_signal_handlers(previous)
    finally:
        for logger in loggers:
            logger.close()
        for trainer in trainers:
            trainer.close()


def _install_signal_handlers(trainers: list[Trainer]) -> dict[int, Any]:
    if not _in_main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        if trainers[0].stop_requested:
            raise KeyboardInterrupt
        for trainer in trainers:
            trainer.stop_requested = True
        print(
            f"\n{signal.Signals(signum).name}: finishing the current episode, then saving a checkpoint "
            "(send it again to exit at once, keeping the previous checkpoint)",
            file=sys.stderr,
        )

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = resolve_runs(args)
        if args.print_config:
            print(yaml.safe_dump(runs[0][0].to_dict(), sort_keys=False), end="")
            return 0
        for _, run_dir, state in runs:
            if state is None:
                print(f"run directory: {run_dir}", file=sys.stderr)
            else:
                print(f"resuming {run_dir} from step {state['step']}", file=sys.stderr)
        return run_together(runs, progress=not args.no_progress)
    except (ConfigError, EnvError, CheckpointError, NonFiniteLossError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
