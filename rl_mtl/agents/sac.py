"""Multi-task SAC whose critic and actor updates combine per-task gradients with an aggregator.

One update (DESIGN.md, "the data flow of one update"):
  1. the TD target for every task, once, under no_grad;
  2. the K critic losses and their per-task gradients in one vmapped pass; the aggregator turns
     the Gramian into weights; the shared critic parameters get weights @ G, per-task ones their
     own gradient; Adam steps;
  3. the same for the K actor losses (alpha_k log pi - min Q), against the updated critic;
  4. the temperatures (one per task, or one shared) from the actor's log-probabilities;
  5. Polyak averaging of the target critic.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregators import Aggregator
from ..buffers import Batch
from ..config import AgentConfig
from ..gradients import TaskGradients, detached, task_gradients, write_gradients
from .networks import Actor, TwinCritic


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses persist for too many consecutive updates."""


def min_pairwise_cosine(gramian: Tensor) -> Tensor:
    """The smallest cosine similarity between two different task gradients (nan for K = 1)."""
    k = gramian.shape[0]
    if k < 2:
        return gramian.new_tensor(float("nan"))
    norms = torch.sqrt(torch.clamp(torch.diagonal(gramian), min=1e-30))
    cosine = gramian / torch.outer(norms, norms)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=gramian.device)
    return cosine[off_diagonal].min()


class MultiTaskSAC(nn.Module):
    def __init__(
        self, obs_dim: int, action_dim: int, num_tasks: int, cfg: AgentConfig, device: torch.device, seed: int = 0
    ) -> None:
        super().__init__()
        self.cfg, self.num_tasks, self.action_dim, self.device = cfg, num_tasks, action_dim, device
        hidden, arch = list(cfg.hidden_sizes), cfg.architecture
        self.actor = Actor(obs_dim, action_dim, hidden, num_tasks, arch, cfg.init, cfg.log_std_min, cfg.log_std_max)
        self.critic = TwinCritic(obs_dim, action_dim, hidden, num_tasks, arch, cfg.init)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        n_temps = num_tasks if cfg.temperature == "per_task" else 1
        self.log_alpha = nn.Parameter(torch.full((n_temps,), float(cfg.init_temperature)).log())
        self.target_entropy = -float(action_dim) if cfg.target_entropy is None else float(cfg.target_entropy)
        self.to(device)
        fused = device.type == "cuda"  # one kernel per step on the GPU
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, fused=fused)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, fused=fused)
        self.temperature_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.temperature_lr, fused=fused)
        # noise for the reparameterised actions (updates and exploration), seeded, checkpointed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.nonfinite_streak = 0
        self.nonfinite_total = 0

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """obs [K, obs_dim] (one env per task) -> actions [K, action_dim] in [-1, 1]."""
        obs = obs[:, None]
        if deterministic:
            return self.actor.mode(obs)[:, 0]
        noise = torch.randn(obs.shape[0], 1, self.action_dim, generator=self.generator, device=self.device)
        return self.actor.sample(obs, noise)[0][:, 0]

    def temperatures(self) -> Tensor:
        """[K]: the temperature each task uses."""
        return self.log_alpha.exp().expand(self.num_tasks)

    # -- one update ---------------------------------------------------------------------------
    def update(
        self, batch: Batch, critic_aggregator: Aggregator, actor_aggregator: Aggregator, need_diagnostics: bool = False
    ) -> dict[str, Tensor] | None:
        """One SAC update. Returns per-task metric tensors (on the device), or None when the
        update was skipped because a loss or gradient was not finite."""
        k, b = batch.reward.shape
        alpha = self.temperatures().detach()

        with torch.no_grad():
            noise = torch.randn(k, b, self.action_dim, generator=self.generator, device=self.device)
            next_action, next_log_prob = self.actor.sample(batch.next_obs, noise)
            target_q1, target_q2 = self.critic_target(batch.next_obs, next_action)
            soft_value = torch.min(target_q1, target_q2) - alpha[:, None] * next_log_prob
            td_target = batch.reward + self.cfg.gamma * (1.0 - batch.terminated) * soft_value  # [K, B]

        critic = self.critic

        def critic_loss(shared, task, task_batch):
            obs, action, target = task_batch
            q1, q2 = critic.forward_one(shared, task, obs, action)
            return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

        critic_shared, critic_task = critic.split()
        critic_grads = task_gradients(critic_loss, critic_shared, critic_task, (batch.obs, batch.action, td_target))
        critic_weights, critic_gram = self._combine(critic_grads, critic_aggregator, need_diagnostics)
        if critic_weights is None:
            return None
        write_gradients(critic_shared, critic_task, critic_grads, critic_weights)
        self.critic_optimizer.step()

        # The actor sees the updated critic as a constant: its parameters enter as plain tensors.
        critic_shared_now, critic_task_now = detached(critic_shared), detached(critic_task)
        actor = self.actor

        def actor_loss(shared, task, task_batch):
            obs, noise_k, alpha_k, critic_task_k = task_batch
            action, log_prob = actor.sample_one(shared, task, obs, noise_k)
            q1, q2 = critic.forward_one(critic_shared_now, critic_task_k, obs, action)
            return (alpha_k * log_prob - torch.min(q1, q2)).mean(), log_prob.mean()

        noise = torch.randn(k, b, self.action_dim, generator=self.generator, device=self.device)
        actor_shared, actor_task = actor.split()
        actor_batch = (batch.obs, noise, alpha, critic_task_now)
        actor_grads = task_gradients(actor_loss, actor_shared, actor_task, actor_batch, has_aux=True)
        actor_weights, actor_gram = self._combine(actor_grads, actor_aggregator, need_diagnostics)
        if actor_weights is None:
            return None
        write_gradients(actor_shared, actor_task, actor_grads, actor_weights)
        self.actor_optimizer.step()

        # Temperature: per task, each log-alpha gets its own task's gradient; shared: the mean.
        mean_log_prob = actor_grads.aux.detach()  # [K]
        per_task_loss = -self.log_alpha.expand(k) * (mean_log_prob + self.target_entropy)
        self.temperature_optimizer.zero_grad(set_to_none=True)
        (per_task_loss.sum() if self.log_alpha.numel() == k else per_task_loss.mean()).backward()
        self.temperature_optimizer.step()

        with torch.no_grad():
            target_params = list(self.critic_target.parameters())
            torch._foreach_lerp_(target_params, list(self.critic.parameters()), self.cfg.tau)

        metrics = {
            "critic_loss": critic_grads.losses,
            "actor_loss": actor_grads.losses,
            "temperature": self.temperatures().detach(),
            "entropy": -mean_log_prob,
            "critic_weights": critic_weights,
            "actor_weights": actor_weights,
        }
        if critic_gram is not None and actor_gram is not None:
            metrics["critic_min_cosine"] = min_pairwise_cosine(critic_gram)
            metrics["actor_min_cosine"] = min_pairwise_cosine(actor_gram)
        return metrics

    def _combine(
        self, grads: TaskGradients, aggregator: Aggregator, need_diagnostics: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Weights for the task gradients, or (None, None) to skip a non-finite update."""
        has_shared = bool(grads.shared)
        need_gramian = has_shared and (aggregator.needs_gramian() or need_diagnostics)
        gramian = grads.gramian() if need_gramian else None
        # One host sync per loss: a non-finite loss or gradient must never reach the optimiser.
        # The gradients are checked themselves (a finite loss can still overflow in backward),
        # whether or not this step computes the Gramian.
        if not bool(torch.isfinite(grads.total())):
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            self.critic_optimizer.zero_grad(set_to_none=True)
            self.actor_optimizer.zero_grad(set_to_none=True)
            return None, None
        self.nonfinite_streak = 0
        if not has_shared:  # independent networks: nothing to aggregate
            return torch.ones_like(grads.losses), None
        weights = aggregator(gramian if aggregator.needs_gramian() else None, grads.losses)
        return weights, gramian

    # -- checkpointing --------------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        return {
            "modules": self.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "temperature_optimizer": self.temperature_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["modules"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.temperature_optimizer.load_state_dict(state["temperature_optimizer"])
        self.generator.set_state(state["generator"])
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.nonfinite_total = int(state["nonfinite_total"])
