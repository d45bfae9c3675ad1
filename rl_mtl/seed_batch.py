"""Several seeds trained together in one process: ``python -m rl_mtl.train --seeds 0-9``.

Every seed is a complete ``Trainer`` with its own run directory, envs, replay buffer, agent,
aggregators, warm-up generator, logs and checkpoints; a seed run this way can later be resumed
on its own and vice versa. ``SeedBatch`` only replaces the two steps whose cost is per call
rather than per number:

  * acting and updating: one ``SeedStackedSAC`` pass over all seeds' stacked parameters, each
    seed drawing its noise and batches from its own generators (so its numbers are those of the
    single-seed algorithm, up to summation order inside batched kernels);
  * stepping: every seed's vector env is sent its actions before any is waited on, so async
    envs (``env.vector_strategy=async``: one process per task and seed) step on all cores at
    once, overlapped with the update when ``train.overlap_env`` is on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .agents.seed_stack import SeedStackedSAC
from .buffers import StackedReplay
from .envs import run_evaluations
from .train import Trainer, collect_and_learn


class SeedBatch:
    def __init__(self, trainers: list[Trainer]) -> None:
        self.trainers = trainers
        self.lead = trainers[0]  # all seeds share the config up to the seed, and step together
        self.device = self.lead.device
        self.overlap = self.lead.overlap
        self.agent = SeedStackedSAC([t.agent for t in trainers])
        self.replay = StackedReplay([t.buffer for t in trainers])
        self._obs_on_device: tuple[list[np.ndarray], torch.Tensor | None] = ([], None)

    def advance(self, learns: bool, diagnostics: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """``Trainer.advance`` for every seed: [(terminated, truncated)] per seed."""
        return collect_and_learn(self, learns, diagnostics)

    def collect_step(self, while_stepping: Callable[[], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        trainers = self.trainers
        cached, cached_t = self._obs_on_device
        reuse = len(cached) == len(trainers) and all(c is t.obs for c, t in zip(cached, trainers, strict=True))
        obs_t = cached_t if reuse else self.lead.to_device(np.stack([t.obs for t in trainers]))
        if self.lead.warming_up:
            action = np.stack([t.warmup_action() for t in trainers])
            action_t = self.lead.to_device(action)
        else:
            action_t = self.agent.act(obs_t)
            action = action_t.cpu().numpy().astype(np.float64)
        for trainer, seed_action in zip(trainers, action, strict=True):
            trainer.runner.step_async(seed_action)  # async envs: every seed steps at once
        if while_stepping is not None:
            while_stepping()
        received = [t.receive() for t in trainers]
        packed_t = self.lead.to_device(np.stack([packed for packed, _, _ in received]))  # [S, K, obs_dim + 2]
        next_obs_t = packed_t[..., :-2]
        self.replay.add(obs_t, action_t, packed_t[..., -2], next_obs_t, packed_t[..., -1])
        self._obs_on_device = ([t.runner.obs for t in trainers], next_obs_t)
        for trainer in trainers:
            trainer.step += 1
        return [(terminated, truncated) for _, terminated, truncated in received]

    def learn(self, diagnostics: bool) -> None:
        t = self.lead.cfg.train
        critic_aggregators = [tr.critic_aggregator for tr in self.trainers]
        actor_aggregators = [tr.actor_aggregator for tr in self.trainers]
        for i in range(t.updates_per_step):
            batch = self.replay.sample(t.batch_size_per_task)
            last = i == t.updates_per_step - 1
            results = self.agent.update(batch, critic_aggregators, actor_aggregators, diagnostics and last)
            for trainer, metrics in zip(self.trainers, results, strict=True):
                trainer.sums.add(metrics)

    def evaluate(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Evaluate every seed at once (each with its own eval env and policy): per seed, the
        per-task (success, return) that ``Trainer.finish_step`` logs."""
        t, env = self.lead.cfg.train, self.lead.cfg.env

        def policy(obs: np.ndarray) -> np.ndarray:
            return self.agent.act(self.lead.to_device(obs), deterministic=True).cpu().numpy().astype(np.float64)

        eval_envs = [trainer.eval_env for trainer in self.trainers]
        success, returns = run_evaluations(eval_envs, policy, t.eval_episodes, env.max_episode_steps)
        return list(zip(success, returns, strict=True))
