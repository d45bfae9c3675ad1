"""Multi-task SAC whose critic and actor updates combine per-task gradients with an aggregator.

One update (DESIGN.md, "the data flow of one update"):
  1. the TD target for every task, once, under no_grad;
  2. the K critic losses and their per-task gradients in one vmapped pass; the aggregator turns
     the Gramian into weights; the shared critic parameters get weights @ G, per-task ones their
     own gradient; Adam steps;
  3. the same for the K actor losses (alpha_k log pi - min Q), against the updated critic;
  4. the temperatures (one per task, or one shared) from the actor's log-probabilities;
  5. Polyak averaging of the target critic.

Nothing in it reads a value back to the host: an update whose losses or gradients are not
finite is skipped on the device (``step_unless``: the fused optimisers' ``found_inf``, a Polyak
weight of zero), counted in device counters that the trainer reads when it logs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregators import Aggregator
from ..buffers import Batch
from ..config import AgentConfig
from ..gradients import TaskGradients, detached, set_gradients, task_gradient_fields
from .networks import Actor, Params, SplitParams, TwinCritic


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses persist for too many consecutive updates."""


def min_pairwise_cosine(gramian: Tensor) -> Tensor:
    """The smallest cosine similarity between two different task gradients (nan for K = 1)."""
    k = gramian.shape[0]
    if k < 2:
        return gramian.new_tensor(float("nan"))
    norms = torch.sqrt(torch.clamp(torch.diagonal(gramian), min=1e-30))
    cosine = gramian / torch.outer(norms, norms)
    diagonal = torch.eye(k, dtype=torch.bool, device=gramian.device)
    return torch.where(diagonal, torch.inf, cosine).min()  # a boolean mask would sync for its size


def aggregate(grads: TaskGradients, gramian: Tensor | None, aggregator: Aggregator) -> Tensor:
    """The aggregator's weights [K]; it gets the Gramian only on calls that need it (the
    aggregator runs whether or not the update is skipped: deciding that would need a host read,
    and on non-finite input it returns finite weights and counts a fallback). Independent
    networks share nothing: all ones."""
    if not grads.shared:
        return torch.ones_like(grads.losses)
    return aggregator(gramian if aggregator.needs_gramian() else None, grads.losses)


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """Step ``optimizer`` (a fused Adam) unless ``skip``, a 0-dim bool on the device, decided
    there: the fused kernel takes GradScaler's ``found_inf`` flag, leaves parameters and moments
    untouched when it is set and the optimiser restores its step counts, with no host read."""
    optimizer.found_inf = skip.to(torch.float32)
    optimizer.step()


def load_fused(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an Adam's state and keep it fused (``step_unless`` needs that): a checkpoint from
    before every Adam here was fused restores a non-fused group, with CPU step counts."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    for param, param_state in optimizer.state.items():
        if "step" in param_state:
            param_state["step"] = param_state["step"].to(device=param.device, dtype=torch.float32)


def soft_update(targets: list[Tensor], sources: list[Tensor], weight: Tensor) -> None:
    """Polyak step targets += weight (sources - targets). ``weight`` is 0-dim, or [S] for
    seed-stacked tensors (one weight per seed); zero where an update was skipped."""
    lead = (-1,) if weight.ndim else ()
    torch._foreach_lerp_(targets, sources, [weight.reshape(*lead, *[1] * (t.ndim - weight.ndim)) for t in targets])


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """``fn``, or ``fn`` compiled whole: ``fullgraph`` because a graph break would silently
    leave part of the pass eager; ``dynamic=False`` because a run's shapes never change."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn


class MultiTaskSAC(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_tasks: int,
        cfg: AgentConfig,
        device: torch.device,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        """``compile``: run the update's batched passes through ``torch.compile`` (train.compile)."""
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
        # Fused: one kernel per step, and the only Adam that can skip a step on the device.
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, fused=True)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, fused=True)
        self.temperature_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.temperature_lr, fused=True)
        # noise for the reparameterised actions (updates and exploration), seeded, checkpointed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # Skipped (non-finite) updates, counted on the device: in all, in a row now, and the
        # longest run in a row so far (what the trainer checks against train.max_nonfinite_updates).
        self.skip_counts = torch.zeros(3, dtype=torch.int64, device=device)
        # The update's three batched passes, bound to this architecture (compiled or not). The
        # seed-batched agent compiles its own vmapped versions of the same functions.
        self.compiled = compile
        self.td_target_pass = maybe_compile(functools.partial(soft_td_target, self.actor, self.critic), compile)
        self.critic_pass = maybe_compile(functools.partial(critic_gradients, self.critic), compile)
        self.actor_pass = maybe_compile(functools.partial(actor_gradients, self.actor, self.critic), compile)

    # -- acting -------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """obs [K, obs_dim] (one env per task) -> actions [K, action_dim] in [-1, 1]."""
        obs = obs[:, None]
        if deterministic:
            return self.actor.mode(obs)[:, 0]
        return self.actor.sample(obs, self.noise(obs.shape[0], 1))[0][:, 0]

    def temperatures(self) -> Tensor:
        """[K]: the temperature each task uses."""
        return self.log_alpha.exp().expand(self.num_tasks)

    # -- one update ---------------------------------------------------------------------------
    def update(
        self, batch: Batch, critic_aggregator: Aggregator, actor_aggregator: Aggregator, need_diagnostics: bool = False
    ) -> dict[str, Tensor]:
        """One SAC update. Returns per-task metric tensors (on the device) and ``applied``, a
        0-dim bool: False when the update was skipped because a loss or gradient was not finite.
        A skipped update changes nothing (networks, optimiser states, temperatures, target
        critic); a non-finite critic skips everything, a non-finite actor everything but the
        critic's step, which came first.

        The seed-batched agent (``SeedStackedSAC``) runs the same steps for several agents at
        once: the pure functions below and the aggregators' solves under ``vmap`` over seeds, the
        ``apply_*`` methods (optimiser steps) per seed.
        """
        k, b = batch.reward.shape
        alpha = self.temperatures().detach()
        td_target = self.td_target_pass(
            self.actor.split(), self.critic_target.split(), batch.next_obs, batch.reward, batch.terminated,
            self.noise(k, b), alpha, self.cfg.gamma,
        )  # fmt: skip
        critic_grads = TaskGradients(*self.critic_pass(*self.critic.split(), batch.obs, batch.action, td_target))
        critic_gram = self.gramian_for(critic_grads, critic_aggregator, need_diagnostics)
        critic_ok = torch.isfinite(critic_grads.total())
        critic_weights = aggregate(critic_grads, critic_gram, critic_aggregator)
        self.apply_gradients("critic", critic_grads.combine(critic_weights), critic_grads.task_specific, critic_ok)

        # The actor sees the updated critic as a constant: its parameters enter as plain tensors.
        critic_now = tuple(detached(p) for p in self.critic.split())
        noise = self.noise(k, b)
        actor_grads = TaskGradients(*self.actor_pass(*self.actor.split(), *critic_now, batch.obs, noise, alpha))
        actor_gram = self.gramian_for(actor_grads, actor_aggregator, need_diagnostics)
        applied = critic_ok & torch.isfinite(actor_grads.total())
        actor_weights = aggregate(actor_grads, actor_gram, actor_aggregator)
        self.apply_gradients("actor", actor_grads.combine(actor_weights), actor_grads.task_specific, applied)
        self.apply_temperature(actor_grads.aux, applied)
        with torch.no_grad():
            targets, sources = list(self.critic_target.parameters()), list(self.critic.parameters())
            soft_update(targets, sources, self.cfg.tau * applied)
        self.count_skip(applied)
        metrics = self.update_metrics(critic_grads, actor_grads, critic_weights, actor_weights, critic_gram, actor_gram)
        return {**metrics, "applied": applied}

    def noise(self, num_tasks: int, batch_size: int) -> Tensor:
        """Standard normal noise [K, B, A] from this agent's generator."""
        return torch.randn(num_tasks, batch_size, self.action_dim, generator=self.generator, device=self.device)

    @staticmethod
    def wants_gramian(grads: TaskGradients, aggregator: Aggregator, need_diagnostics: bool) -> bool:
        """Whether this update computes the Gramian: for the aggregator's solve or diagnostics,
        and only where there are shared parameters to aggregate."""
        return bool(grads.shared) and (aggregator.needs_gramian() or need_diagnostics)

    def gramian_for(self, grads: TaskGradients, aggregator: Aggregator, need_diagnostics: bool) -> Tensor | None:
        """The Gramian when ``wants_gramian`` (None: not computed)."""
        return grads.gramian() if self.wants_gramian(grads, aggregator, need_diagnostics) else None

    def apply_gradients(
        self, network: str, combined: dict[str, Tensor], task_grads: dict[str, Tensor], ok: Tensor
    ) -> None:
        """Set the ``network``'s ("critic" or "actor") gradients, ``combined`` (the aggregated
        shared ones) and each task's own, and step its optimiser unless ``ok`` (0-dim bool) is
        False: a non-finite step never reaches the parameters (``ok`` checks the gradients
        themselves, since a finite loss can still overflow in backward)."""
        module, optimizer = getattr(self, network), getattr(self, f"{network}_optimizer")
        set_gradients(*module.split(), combined, task_grads)
        step_unless(optimizer, ~ok)

    def apply_temperature(self, mean_log_prob: Tensor, ok: Tensor) -> None:
        """Temperature step (skipped unless ``ok``). The loss is -log_alpha_k (mean log pi_k +
        target entropy): per task, each log-alpha gets its own task's gradient; shared, the mean
        over tasks. Written as the gradient itself: no autograd graph for K numbers."""
        gap = mean_log_prob.detach() + self.target_entropy
        k = gap.shape[0]
        self.log_alpha.grad = -gap if self.log_alpha.numel() == k else -(gap / k).sum().reshape(1)
        step_unless(self.temperature_optimizer, ~ok)

    def count_skip(self, applied: Tensor) -> None:
        """Update ``skip_counts`` (total, streak, longest streak) after an update, on the device."""
        skipped = (~applied).to(torch.int64)
        total, streak, longest = self.skip_counts.unbind()
        streak = (streak + 1) * skipped
        self.skip_counts.copy_(torch.stack([total + skipped, streak, torch.maximum(longest, streak)]))

    @property
    def nonfinite_total(self) -> int:
        """Skipped updates so far (reading it synchronises with the device)."""
        return int(self.skip_counts[0])

    @property
    def longest_nonfinite_streak(self) -> int:
        """The most consecutive skipped updates so far (reading it synchronises)."""
        return int(self.skip_counts[2])

    def update_metrics(
        self,
        critic_grads: TaskGradients,
        actor_grads: TaskGradients,
        critic_weights: Tensor,
        actor_weights: Tensor,
        critic_gram: Tensor | None,
        actor_gram: Tensor | None,
    ) -> dict[str, Tensor]:
        metrics = {
            "critic_loss": critic_grads.losses,
            "actor_loss": actor_grads.losses,
            "temperature": self.temperatures().detach(),
            "entropy": -actor_grads.aux.detach(),
            "critic_weights": critic_weights,
            "actor_weights": actor_weights,
        }
        if critic_gram is not None and actor_gram is not None:
            metrics["critic_min_cosine"] = min_pairwise_cosine(critic_gram)
            metrics["actor_min_cosine"] = min_pairwise_cosine(actor_gram)
        return metrics

    # -- checkpointing --------------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        return {
            "modules": self.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "temperature_optimizer": self.temperature_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "skip_counts": self.skip_counts.cpu(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["modules"])
        for name in ("critic_optimizer", "actor_optimizer", "temperature_optimizer"):
            load_fused(getattr(self, name), state[name])
        self.generator.set_state(state["generator"])
        if "skip_counts" in state:
            self.skip_counts.copy_(state["skip_counts"])
        else:  # a checkpoint from before the counters moved to the device
            streak = int(state["nonfinite_streak"])
            self.skip_counts.copy_(torch.tensor([int(state["nonfinite_total"]), streak, streak]))


# ---------------------------------------------------------------------------------------------
# The update's pure parts: functions of explicit parameters, so that the seed-batched agent can
# run them under vmap over seeds with stacked parameters (the same code per seed).
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def soft_td_target(
    actor: Actor,
    critic: TwinCritic,
    actor_params: SplitParams,
    target_params: SplitParams,
    next_obs: Tensor,
    reward: Tensor,
    terminated: Tensor,
    noise: Tensor,
    alpha: Tensor,
    gamma: float,
) -> Tensor:
    """r + gamma (1 - terminated) (min target Q(s', a') - alpha log pi(a'|s')), [K, B]."""
    next_action, next_log_prob = actor.sample(next_obs, noise, actor_params)
    target_q1, target_q2 = critic(next_obs, next_action, target_params)
    soft_value = torch.min(target_q1, target_q2) - alpha[:, None] * next_log_prob
    return reward + gamma * (1.0 - terminated) * soft_value


def critic_gradients(
    critic: TwinCritic, shared: Params, task: Params, obs: Tensor, action: Tensor, td_target: Tensor
) -> tuple:
    """Per-task gradients of the twin critics' squared TD errors (``task_gradient_fields``)."""

    def critic_loss(shared, task, task_batch):
        obs, action, target = task_batch
        q1, q2 = critic.forward_one(shared, task, obs, action)
        return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

    return task_gradient_fields(critic_loss, shared, task, (obs, action, td_target))


def actor_gradients(
    actor: Actor,
    critic: TwinCritic,
    shared: Params,
    task: Params,
    critic_shared: Params,
    critic_task: Params,
    obs: Tensor,
    noise: Tensor,
    alpha: Tensor,
) -> tuple:
    """Per-task gradients of alpha_k log pi - min Q against a constant critic; aux: the mean
    log-probability per task (for the temperature)."""

    def actor_loss(shared, task, task_batch):
        obs, noise_k, alpha_k, critic_task_k = task_batch
        action, log_prob = actor.sample_one(shared, task, obs, noise_k)
        q1, q2 = critic.forward_one(critic_shared, critic_task_k, obs, action)
        return (alpha_k * log_prob - torch.min(q1, q2)).mean(), log_prob.mean()

    return task_gradient_fields(actor_loss, shared, task, (obs, noise, alpha, critic_task), has_aux=True)
