"""A population's training: the runs it trains (new or resumed run directories), its parts, and
the stages that ``train.train_loop`` strings together.

A population is S >= 1 seeds of one config trained in one process: one ``Population`` of agents,
one ``ReplayBuffer``, one vector env per seed stepped together (``PopulationEnvs``), one
evaluation, one metric sum, all with a leading seed axis. Each seed keeps its own run directory,
config, log, checkpoint and random streams, so a seed trained in a population is the seed
trained alone, and its checkpoint resumes alone or with others.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from .agents import SAC, NonFiniteLossError, Population, to_host
from .aggregators import AggregatorError
from .buffers import ReplayBuffer
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    make_current,
    resume_points,
    save_checkpoints,
    saved_steps,
)
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
from .envs import (
    EnvError,
    PopulationEnvs,
    RewardNormalizer,
    close_env,
    env_checkpoint,
    load_env_checkpoint,
    make_vector_env,
    run_evaluations,
    task_names,
)
from .metrics import METRICS_NAME, MetricSums, RunLogger, per_task, training_scalars, truncate_metrics
from .run_dir import (
    CONFIG_NAME,
    RUN_INFO_NAME,
    RunDirError,
    default_run_dir,
    describe_write_error,
    lock_run_dir,
    remove_stale_temporaries,
    run_metadata,
    runs_root,
    write_text_atomic,
)
from .runtime import resolve_compile, resolve_device, rng_state, seed_everything, set_determinism, set_rng_state

RunSpec = tuple[Config, Path, "dict[str, Any] | None"]  # (config, run directory, checkpoint to resume)


# -- which runs: new ones, or resumed run directories ------------------------------------------------
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


class Training:
    """Everything a population's training owns; ``seed_state`` / ``load_seed_state`` cover all of
    it, one seed at a time. ``envs`` / ``eval_envs``: prebuilt vector envs, one per seed (the
    benchmark shares them between methods); ``log=False`` opens no run directory (benchmarks)."""

    def __init__(self, runs: list[RunSpec], envs: list[Any] | None = None, eval_envs: list[Any] | None = None,
                 log: bool = True) -> None:  # fmt: skip
        check_trainable_together(runs)
        self.cfg = cfg = runs[0][0]  # the seeds share it up to the seed
        self.configs = [c for c, _, _ in runs]
        self.run_dirs = [d for _, d, _ in runs]
        seeds = [c.seed for c in self.configs]
        self.device = resolve_device(cfg.device)
        self.deterministic = set_determinism(cfg, self.device)
        seed_everything(seeds[0])
        self.tasks = task_names(cfg.env)
        k = len(self.tasks)
        self.envs, self.eval_envs, self.loggers = PopulationEnvs([], k), [], []
        try:  # whatever fails below (a foreign checkpoint, too little memory), no env process is left behind
            self._build(runs, envs, eval_envs, log)
        except BaseException:
            self.close()
            raise

    def _build(self, runs: list[RunSpec], envs: list[Any] | None, eval_envs: list[Any] | None, log: bool) -> None:
        cfg, seeds, k = self.cfg, [c.seed for c in self.configs], len(self.tasks)
        for seed, env in zip(seeds, envs or [None] * len(seeds), strict=True):
            self.envs.add(env or make_vector_env(cfg.env, seed))
        for seed, env in zip(seeds, eval_envs or [None] * len(seeds), strict=True):
            self.eval_envs.append(env or make_vector_env(cfg.env, seed, evaluation=True))
        # Overlap the update with the env step where the env can (validated in config).
        self.overlap = self.envs.can_overlap if cfg.train.overlap_env is None else cfg.train.overlap_env
        env = self.envs.runners[0].env
        obs_dim, action_dim = env.single_observation_space.shape[0], env.single_action_space.shape[0]
        self.compile_mode = resolve_compile(cfg, self.device)
        options = cfg.method_options.get(cfg.method, {})
        try:  # the networks' options are checked with this run's tasks here (a context file's rows)
            self.sac = SAC(obs_dim, action_dim, self.tasks, cfg.agent, cfg.method, options,
                           compile=self.compile_mode == "passes")  # fmt: skip
            self.population = Population(self.sac, seeds, self.device, compile=self.compile_mode)
        except AggregatorError as err:  # an option that names tasks (AuxiNash's main_task)
            raise ConfigError(f"method_options.{cfg.method}: {err}") from err
        except ValueError as err:
            raise ConfigError(f"agent.architecture_options.{cfg.agent.architecture}: {err}") from err
        if self.compile_mode in ("whole", "graphs") and not self.sac.aggregator.on_device:
            raise ConfigError(f"train.compile={self.compile_mode} compiles the whole update, but {cfg.method} with "
                              f"method_options {options} solves on the host; use its native solver or "
                              "train.compile=passes")  # fmt: skip
        capacity = cfg.train.buffer_capacity_per_task
        self.replay = ReplayBuffer([s + 1 for s in seeds], k, capacity, obs_dim, action_dim, self.device)
        self.normalizer = RewardNormalizer(len(seeds), k, cfg.env.reward_norm_rate) if cfg.env.reward_normalization \
            else None  # fmt: skip
        self.warmup_rngs = [np.random.default_rng(seed + 3) for seed in seeds]  # random actions before learning
        self.action_dim = action_dim
        self.step, self.last_checkpoint_step, self.last_eval_step = 0, 0, -1
        self.sums = MetricSums(len(seeds), k, self.device)
        self.stop_requested = False
        self.envs.reset_all()
        states = [state for _, _, state in runs]
        if states[0] is not None:
            self.load_states(states)  # type: ignore[arg-type]
        if log:
            self._open_run_dirs(states)
        self.interval_start, self.interval_start_step = time.perf_counter(), self.step

    @property
    def size(self) -> int:
        return self.population.size

    def _open_run_dirs(self, states: list[dict[str, Any] | None]) -> None:
        """Write each run's config and provenance and open its log, as this process, the
        directory's only writer (a resume records in its provenance what it changed)."""
        for cfg, run_dir, state in zip(self.configs, self.run_dirs, states, strict=True):
            lock_run_dir(run_dir)
            remove_stale_temporaries(run_dir)
            changed = {}
            if state is not None:
                truncate_metrics(run_dir / METRICS_NAME, self.step)
                before, after = flatten(state["config"]), flatten(cfg.to_dict())
                changed = {k: [before.get(k), after[k]] for k in diff_configs(config_from_dict(state["config"]), cfg)}
                for key, (old, new) in changed.items():
                    print(f"{run_dir}: resuming with {key} changed from {old} to {new}", file=sys.stderr)
            write_text_atomic(run_dir / CONFIG_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            info = run_metadata(cfg, self.device, self.deterministic, self.compile_mode, self.tasks,
                                [c.seed for c in self.configs], self.sac.describe(), changed)  # fmt: skip
            write_text_atomic(run_dir / (RUN_INFO_NAME if state is None else f"run.resumed-{self.step}.json"), info)
            self.loggers.append(RunLogger(run_dir, purge_step=None if state is None else self.step + 1))

    # -- the stages of one step ---------------------------------------------------------------------
    def to_device(self, array: np.ndarray) -> Tensor:
        """A float32 copy of env data on the training device."""
        return torch.as_tensor(array, dtype=torch.float32, device=self.device)

    def random_actions(self) -> Tensor:
        """Uniform random actions [S, K, A], each seed's from its own warm-up generator."""
        k = len(self.tasks)
        return self.to_device(np.stack([rng.uniform(-1.0, 1.0, (k, self.action_dim)) for rng in self.warmup_rngs]))

    def receive(self) -> tuple[Tensor, Tensor, Tensor, np.ndarray]:
        """Finish the envs' step: (next_obs [S, K, obs_dim], reward [S, K], terminated [S, K]) on
        the device, with one host-to-device copy, and ``done`` [S, K] (terminated or truncated)."""
        next_obs, reward, terminated, truncated = self.envs.step_wait()
        if self.normalizer is not None:
            reward = self.normalizer(reward)
        packed = self.to_device(np.concatenate([next_obs, reward[..., None], terminated[..., None]], axis=-1))
        return packed[..., :-2], packed[..., -2], packed[..., -1], terminated | truncated

    def collect_and_learn(self, obs: Tensor, action: Tensor, learning: bool, diagnostics: bool
                          ) -> tuple[Tensor, np.ndarray]:  # fmt: skip
        """Step every env with ``action`` [S, K, A] from ``obs``, store the transitions and, once
        ``learning``, update. With async envs the update runs while they step (between
        ``step_async`` and ``step_wait``, sampling the replay before this step's transitions join
        it); otherwise after the transitions are stored. Returns (next_obs, done [S, K])."""
        self.envs.step_async(to_host(action))
        if learning and self.overlap:
            self.learn(diagnostics)
        next_obs, reward, terminated, done = self.receive()
        self.replay.add(obs, action, reward, next_obs, terminated)
        if learning and not self.overlap:
            self.learn(diagnostics)
        return next_obs, done

    def learn(self, diagnostics: bool) -> None:
        """``train.updates_per_step`` updates of every seed; the last one logs diagnostics if asked.
        A method that learns from a main task gets a second, held-out batch every
        ``update_powers_every`` updates (counted from the step, so a resumed run keeps the rhythm)."""
        t, agg = self.cfg.train, self.sac.aggregator
        for i in range(t.updates_per_step):
            batch = self.replay.sample(t.batch_size_per_task)
            index = (self.step - t.warmup_steps) * t.updates_per_step + i
            held_out = agg.learns_powers and (index + 1) % agg.update_powers_every == 0
            validation = self.replay.sample(t.batch_size_per_task) if held_out else None
            self.population.update(batch, diagnostics and i == t.updates_per_step - 1, validation, self.sums)

    def check_skipped_updates(self) -> None:
        """Stop once any seed skipped ``train.max_nonfinite_updates`` updates in a row. The counters
        live on the device, so the loop reads them only where a run may log or save (log steps,
        episode ends), before any seed does: the seeds then stop with checkpoints of one step."""
        limit = self.cfg.train.max_nonfinite_updates
        for run_dir, (_, _, longest) in zip(self.run_dirs, self.population.skip_counts(), strict=True):
            if longest >= limit:
                dirs = " ".join(str(d) for d in self.run_dirs)
                raise NonFiniteLossError(
                    f"{run_dir}: {longest} consecutive updates had non-finite losses or gradients (limit "
                    f"train.max_nonfinite_updates={limit}, seen at step {self.step}); stopping. The last checkpoint "
                    f"(step {self.last_checkpoint_step}) is intact: resume from it with smaller learning rates, "
                    f"python -m rl_mtl.train --resume {dirs} --set agent.critic_lr=1e-4 --set agent.actor_lr=1e-4, "
                    "or start again with rewards normalised (--set env.reward_normalization=true)"
                )

    def log_training(self) -> float:
        """Log every seed's interval means; returns the steps per second since the last log."""
        rate = (self.step - self.interval_start_step) / max(time.perf_counter() - self.interval_start, 1e-9)
        means = self.sums.means()
        skips = self.population.skip_counts()
        fallbacks = {name: self.population.fallbacks(name) for name in ("critic", "actor")}
        learned_powers = {} if not self.sac.aggregator.learns_powers else {
            name: self.population.state["aggregators"][name]["powers"].cpu().numpy() for name in ("critic", "actor")
        }  # fmt: skip
        for s, logger in enumerate(self.loggers):
            scalars = {"perf/steps_per_second": rate, "buffer/size": float(len(self.replay))}
            scalars.update(training_scalars(means[s], self.tasks))
            scalars["aggregator/fallbacks_critic"] = float(fallbacks["critic"][s])
            scalars["aggregator/fallbacks_actor"] = float(fallbacks["actor"][s])
            scalars["train/nonfinite_updates"] = float(skips[s][0])
            for network, powers in learned_powers.items():
                scalars.update(per_task(f"{self.cfg.method}/power/{network}", powers[s], self.tasks))
            logger.log(self.step, scalars, kind="train")
        self.sums.reset()
        self.interval_start, self.interval_start_step = time.perf_counter(), self.step
        return rate

    def log_episodes(self, done: np.ndarray) -> None:
        if not self.loggers:
            return
        for runner, seed_done, logger in zip(self.envs.runners, done, self.loggers, strict=True):
            if not seed_done.any():
                continue
            finished = runner.finished_stats(seed_done)
            names = [self.tasks[i] for i in finished["task"]]
            scalars = per_task("episode/return", finished["return"], names)
            scalars.update(per_task("episode/success", finished["success"], names))
            if len(names) == len(self.tasks):
                scalars["episode/return_mean"] = float(finished["return"].mean())
                scalars["episode/success_mean"] = float(finished["success"].mean())
            logger.log(self.step, scalars, kind="episode")

    def eval_due(self) -> bool:
        t = self.cfg.train
        due = (t.eval_every and self.step % t.eval_every == 0) or self.step == t.total_steps
        return bool(due) and self.last_eval_step != self.step

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Every seed's deterministic policy on its own eval env, in lockstep: success and mean
        return [S, K]."""
        t, env = self.cfg.train, self.cfg.env
        return run_evaluations(self.eval_envs, self.population.policy, t.eval_episodes, env.max_episode_steps)

    def log_evaluation(self) -> float:
        """Evaluate and log; returns the mean success over seeds and tasks."""
        self.last_eval_step = self.step
        success, returns = self.evaluate()
        for s, logger in enumerate(self.loggers):
            scalars = per_task("eval/success", success[s], self.tasks)
            scalars.update(per_task("eval/return", returns[s], self.tasks))
            scalars["eval/success_mean"] = float(success[s].mean())
            scalars["eval/return_mean"] = float(returns[s].mean())
            scalars["eval/episodes_per_task"] = float(self.cfg.train.eval_episodes)
            logger.log(self.step, scalars, kind="eval")
        return float(success.mean())

    def save(self, at_boundary: bool) -> None:
        """Every seed's checkpoint. ``at_boundary``: taken at an episode boundary, before the
        next goals are drawn (a resumed run then continues exactly)."""
        if not self.loggers:  # no run directories (a benchmark)
            return
        for logger in self.loggers:
            logger.flush()
        try:
            save_checkpoints(self.run_dirs, lambda s: self.seed_state(s, at_boundary))
        except OSError as err:
            raise RunDirError(describe_write_error(err)) from err
        self.last_checkpoint_step = self.step

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.envs.close()
        for env in self.eval_envs:
            close_env(env)

    # -- one seed's checkpoint ------------------------------------------------------------------------
    def seed_state(self, s: int, at_boundary: bool = True) -> dict[str, Any]:
        cfg = self.configs[s]
        agent = self.population.seed_state(s)
        return {
            "step": self.step,
            "last_eval_step": self.last_eval_step,
            "at_boundary": at_boundary,
            "seed": cfg.seed,
            "method": cfg.method,
            "config": cfg.to_dict(),
            "agent": agent["agent"],
            "agent_generator": agent["generator"],
            "replay": self.replay.seed_state(s),
            "normalizer": None if self.normalizer is None else self.normalizer.seed_state(s),
            "warmup_rng": self.warmup_rngs[s].bit_generator.state,
            "rng": rng_state(),
            "env": env_checkpoint(self.envs.runners[s].env),
            "eval_env": env_checkpoint(self.eval_envs[s]),
            "metric_sums": self.sums.seed_state(s),
        }

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Every seed's checkpoint (all at one step: ``check_trainable_together``). Every field is
        read under ``_refuse_unfitting``, so a checkpoint lacking one is refused, not a traceback."""
        for s, (state, run_dir) in enumerate(zip(states, self.run_dirs, strict=True)):
            with _refuse_unfitting(run_dir):
                self.population.load_seed_state(s, {"agent": state["agent"], "generator": state["agent_generator"]})
                self.replay.load_seed_state(s, state["replay"])
                if self.normalizer is not None:
                    self.normalizer.load_seed_state(s, state["normalizer"])
                self.warmup_rngs[s].bit_generator.state = state["warmup_rng"]
                load_env_checkpoint(self.envs.runners[s].env, state["env"])
                load_env_checkpoint(self.eval_envs[s], state["eval_env"])
                self.sums.load_seed_state(s, state["metric_sums"])
        lead = states[0]  # the population's counters and the process generators: the lead seed's
        with _refuse_unfitting(self.run_dirs[0]):
            self.step = self.last_checkpoint_step = int(lead["step"])
            self.last_eval_step = int(lead["last_eval_step"])
            at_boundary = bool(lead["at_boundary"])
            set_rng_state(lead["rng"])
        # The checkpoint was taken before the finished episodes' reset: do that reset now, with
        # the restored env RNGs, exactly as the uninterrupted run did right after saving.
        if not at_boundary:
            print(
                "warning: this checkpoint was taken mid-episode (the end of a run whose length is not a "
                "multiple of the episode length); episodes restart, so the continuation is not bit-identical "
                "to an uninterrupted run",
                file=sys.stderr,
            )
        self.envs.reset_all()


@contextlib.contextmanager
def _refuse_unfitting(run_dir: Path) -> Iterator[None]:
    """A checkpoint field that is missing or of the wrong kind becomes a CheckpointError naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, EnvError) as err:
        problem = f"it lacks the field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit this run ({problem}); it was written by another "
            "configuration or version of rl-mtl: resume it with that version, or start a new run"
        ) from err
