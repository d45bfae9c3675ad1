"""Several independent SAC agents (one per seed) trained together: ``SeedStackedSAC``.

Each seed keeps a complete ``MultiTaskSAC``: its own optimisers, noise generator, temperature,
non-finite bookkeeping, checkpoint format. Only the storage of the parameters is shared: every
parameter of every seed is a slice of one stacked [S, ...] tensor, so

  * the forward passes and the per-task gradients of all S seeds are ONE ``vmap`` over the seed
    axis of the very functions the single-seed update calls (``soft_td_target``,
    ``critic_gradients``, ``actor_gradients``): S x K tasks in one batched pass;
  * the aggregators' solves of all seeds are one ``vmap`` too (``aggregate_together``: each
    seed keeps its own aggregator state), and so is combining the per-task gradients;
  * each seed's optimiser step (``apply_gradients``) runs per seed, writing through its
    parameters into the stack; a seed whose update is not finite skips it on the device, as
    alone, while the others go on.

So a seed's update is the single-seed algorithm on the same numbers; it differs from a run of
its own only by floating-point summation order inside the batched kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from ..aggregators import Aggregator, aggregate_together
from ..buffers import Batch
from ..gradients import TaskGradients, over_seeds
from .networks import Params, sub_params
from .sac import MultiTaskSAC, actor_gradients, critic_gradients, maybe_compile, soft_td_target, soft_update


def stack_parameters(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    """Stack the same-named parameters of identically built modules into [S, ...] tensors and
    make each module's parameter a view of its slice (the Parameter objects stay the same, so
    optimisers keep working; an in-place step on one seed's parameter updates the stack)."""
    named = [dict(m.named_parameters()) for m in modules]
    stacked = {}
    for name in named[0]:
        params = [n[name] for n in named]
        stacked[name] = torch.stack([p.detach() for p in params])
        for s, p in enumerate(params):
            p.data = stacked[name][s]
    return stacked


def _split(params: Params, names: tuple[dict[str, Tensor], dict[str, Tensor]]) -> tuple[Params, Params]:
    """Partition stacked parameters into (shared, per-task) like the module's own ``split``."""
    shared, task = names
    return {n: params[n] for n in shared}, {n: params[n] for n in task}


class SeedStackedSAC:
    def __init__(self, agents: Sequence[MultiTaskSAC]) -> None:
        if len({a.device for a in agents}) != 1:
            raise ValueError("all seeds' agents must live on one device")
        self.agents = list(agents)
        self.model = agents[0]  # the architecture (its forward functions take explicit parameters)
        stacked = stack_parameters(agents)
        self.actor = _split(sub_params(stacked, "actor"), self.model.actor.split())
        self.critic = _split(sub_params(stacked, "critic"), self.model.critic.split())
        self.critic_target = _split(sub_params(stacked, "critic_target"), self.model.critic_target.split())
        self.log_alpha = stacked["log_alpha"]  # [S, 1 or K]
        self.critic_params = list(sub_params(stacked, "critic").values())
        self.target_params = list(sub_params(stacked, "critic_target").values())
        # The single-seed update's three passes, vmapped over the seed axis (compiled whole when
        # the agents are: compiling the vmapped function lets the compiler see all seeds at once).
        model, on = self.model, self.model.compiled
        td_target = functools.partial(soft_td_target, model.actor, model.critic)
        self.td_target_pass = maybe_compile(vmap(td_target, in_dims=(0, 0, 0, 0, 0, 0, 0, None)), on)  # gamma: shared
        self.critic_pass = maybe_compile(over_seeds(functools.partial(critic_gradients, model.critic)), on)
        self.actor_pass = maybe_compile(over_seeds(functools.partial(actor_gradients, model.actor, model.critic)), on)

    @property
    def num_seeds(self) -> int:
        return len(self.agents)

    def _noise(self, num_tasks: int, batch_size: int) -> Tensor:
        """[S, K, B, A]: each seed's noise from its own generator."""
        return torch.stack([agent.noise(num_tasks, batch_size) for agent in self.agents])

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """obs [S, K, obs_dim] -> actions [S, K, A]: every seed's policy in one pass."""
        obs = obs[:, :, None]
        actor = self.model.actor
        if deterministic:
            return vmap(lambda sh, tk, o: actor.mode(o, (sh, tk)))(*self.actor, obs)[:, :, 0]
        noise = self._noise(obs.shape[1], 1)
        return vmap(lambda sh, tk, o, n: actor.sample(o, n, (sh, tk))[0])(*self.actor, obs, noise)[:, :, 0]

    def temperatures(self) -> Tensor:
        return self.log_alpha.exp().expand(self.num_seeds, self.model.num_tasks)

    def update(
        self,
        batch: Batch,
        critic_aggregators: Sequence[Aggregator],
        actor_aggregators: Sequence[Aggregator],
        need_diagnostics: bool = False,
    ) -> list[dict[str, Tensor]]:
        """One SAC update of every seed on its own batch ([S, K, B, ...]). Returns each seed's
        metrics, with ``applied`` False for a seed whose update was skipped (non-finite), as
        ``MultiTaskSAC.update`` does."""
        _, k, b = batch.reward.shape
        model, agents = self.model, self.agents
        alpha = self.temperatures().detach()
        td = self.td_target_pass(
            self.actor, self.critic_target, batch.next_obs, batch.reward, batch.terminated, self._noise(k, b), alpha,
            model.cfg.gamma,
        )  # fmt: skip
        critic_grads = TaskGradients(*self.critic_pass(*self.critic, batch.obs, batch.action, td))
        critic_ok = torch.isfinite(critic_grads.total())  # [S]
        critic_weights, critic_grams = self._apply(
            "critic", critic_grads, critic_ok, critic_aggregators, need_diagnostics
        )

        # The stacks never require grad: the updated critic enters the actor's loss as a constant.
        actor_grads = TaskGradients(*self.actor_pass(*self.actor, *self.critic, batch.obs, self._noise(k, b), alpha))
        applied = critic_ok & torch.isfinite(actor_grads.total())
        actor_weights, actor_grams = self._apply("actor", actor_grads, applied, actor_aggregators, need_diagnostics)
        for s, agent in enumerate(agents):
            agent.apply_temperature(actor_grads.aux[s], applied[s])
        with torch.no_grad():
            soft_update(self.target_params, self.critic_params, model.cfg.tau * applied)  # one step, all seeds
        metrics = []
        for s, agent in enumerate(agents):
            agent.count_skip(applied[s])
            seed_metrics = agent.update_metrics(
                critic_grads.seed(s), actor_grads.seed(s), critic_weights[s], actor_weights[s], critic_grams[s],
                actor_grams[s],
            )  # fmt: skip
            metrics.append({**seed_metrics, "applied": applied[s]})
        return metrics

    def _apply(
        self,
        network: str,
        grads: TaskGradients,
        ok: Tensor,
        aggregators: Sequence[Aggregator],
        need_diagnostics: bool,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Every seed's aggregation (``aggregate_together``: one batched solve on the GPU path)
        and optimiser step (skipped where ``ok`` [S] is False); (weights [S, K], each seed's
        Gramian or None)."""
        wants = [MultiTaskSAC.wants_gramian(grads, agg, need_diagnostics) for agg in aggregators]
        grams = grads.gramian() if any(wants) else None  # [S, K, K]: one batched product
        if grads.shared:
            weights = aggregate_together(aggregators, grams, grads.losses)
        else:  # independent networks share nothing
            weights = torch.ones_like(grads.losses)
        combined = grads.combine(weights)  # one product per parameter for all seeds
        for s, agent in enumerate(self.agents):
            mine = {name: g[s] for name, g in combined.items()}
            agent.apply_gradients(network, mine, grads.seed(s).task_specific, ok[s])
        return weights, [grams[s] if wanted else None for s, wanted in enumerate(wants)]
