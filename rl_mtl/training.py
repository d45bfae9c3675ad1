"""A population's training: its parts, and the stages that ``train.train_loop`` strings together
(which runs it trains, new or resumed, is ``resume``'s).

A population is S >= 1 seeds of one config trained in one process: one ``Population`` of agents,
one ``ReplayBuffer``, one vector env per seed stepped together (``PopulationEnvs``), one
evaluation, one metric sum, all with a leading seed axis. Each seed keeps its own run directory,
config, log, checkpoint and random streams, so a seed trained in a population is the seed
trained alone, and its checkpoint resumes alone or with others.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from . import __version__
from .agents import SAC, MetricSums, NonFiniteLossError, Population
from .aggregators import AggregatorError
from .buffers import ReplayBuffer
from .checkpoint import save_checkpoints
from .config import ConfigError, config_from_dict, diff_configs, flatten
from .envs import (
    PopulationEnvs,
    RewardNormalizer,
    close_env,
    env_checkpoint,
    load_env_checkpoint,
    make_vector_env,
    run_evaluations,
    task_names,
)
from .metrics import METRICS_NAME, RunLogger, episode_scalars, eval_scalars, training_scalars, truncate_metrics
from .resume import RunSpec, check_trainable_together, refuse_unfitting
from .run_dir import (
    CONFIG_NAME,
    RUN_INFO_NAME,
    RunDirError,
    describe_write_error,
    lock_run_dir,
    remove_stale_temporaries,
    run_metadata,
    write_text_atomic,
)
from .runtime import (
    describe_device,
    resolve_compile,
    resolve_device,
    rng_state,
    seed_everything,
    set_determinism,
    set_rng_state,
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
            info = run_metadata(cfg, describe_device(self.device), self.deterministic, self.compile_mode, self.tasks,
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

    def store(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor) -> None:
        """Add a step's transitions [S, K, ...] to the replay."""
        self.replay.add(obs, action, reward, next_obs, terminated)

    def learn(self, diagnostics: bool) -> None:
        """``train.updates_per_step`` updates of every seed; the last one logs diagnostics if asked.
        Every ``learn_every``-th update (counted from the step, so a resumed run keeps the rhythm)
        the method's own learning runs too, with a second, held-out batch if it asks for one."""
        t, agg = self.cfg.train, self.sac.aggregator
        for i in range(t.updates_per_step):
            batch = self.replay.sample(t.batch_size_per_task)
            index = (self.step - t.warmup_steps) * t.updates_per_step + i
            learn = agg.learn_every > 0 and (index + 1) % agg.learn_every == 0
            held_out = self.replay.sample(t.batch_size_per_task) if learn and agg.needs_held_out else None
            self.population.update(batch, diagnostics and i == t.updates_per_step - 1, learn, held_out, self.sums)

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
        means, skips = self.sums.means(), self.population.skip_counts()
        fallbacks = {name: self.population.fallbacks(name) for name in ("critic", "actor")}
        method_state = self.population.method_state()
        for s, logger in enumerate(self.loggers):
            scalars = training_scalars(
                means[s], self.tasks, rate=rate, buffer_size=len(self.replay),
                fallbacks={name: counts[s] for name, counts in fallbacks.items()}, nonfinite_updates=skips[s][0],
                method_state={prefix: values[s] for prefix, values in method_state.items()},
            )  # fmt: skip
            logger.log(self.step, scalars, kind="train")
        self.sums.reset()
        self.interval_start, self.interval_start_step = time.perf_counter(), self.step
        return rate

    def log_episodes(self, done: np.ndarray) -> None:
        if not self.loggers:
            return
        for runner, seed_done, logger in zip(self.envs.runners, done, self.loggers, strict=True):
            if seed_done.any():
                finished = runner.finished_stats(seed_done)
                names = [self.tasks[i] for i in finished["task"]]
                scalars = episode_scalars(finished["return"], finished["success"], names, len(self.tasks))
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
            logger.log(self.step, eval_scalars(success[s], returns[s], self.tasks, self.cfg.train.eval_episodes),
                       kind="eval")  # fmt: skip
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
            "written_by": __version__,
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
        read under ``resume.refuse_unfitting``, so a checkpoint lacking one is refused, not a traceback."""
        for s, (state, run_dir) in enumerate(zip(states, self.run_dirs, strict=True)):
            with refuse_unfitting(run_dir, state):
                self.population.load_seed_state(s, {"agent": state["agent"], "generator": state["agent_generator"]})
                self.replay.load_seed_state(s, state["replay"])
                if self.normalizer is not None:
                    self.normalizer.load_seed_state(s, state["normalizer"])
                self.warmup_rngs[s].bit_generator.state = state["warmup_rng"]
                load_env_checkpoint(self.envs.runners[s].env, state["env"])
                load_env_checkpoint(self.eval_envs[s], state["eval_env"])
                self.sums.load_seed_state(s, state["metric_sums"])
        lead = states[0]  # the population's counters and the process generators: the lead seed's
        with refuse_unfitting(self.run_dirs[0], lead):
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
