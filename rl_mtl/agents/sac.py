"""Multi-task SAC: one update for a population of S agents whose per-task critic and actor
gradients are combined by an aggregator.

The data flow of one update (DESIGN.md), every tensor with a leading seed axis:
  1. the TD target of every seed and task, under no gradient;
  2. the K critic losses and their per-task gradients G [S, K, P] in one batched pass (``vmap``
     over tasks inside ``vmap`` over seeds); Gramians M = G G^T [S, K, K]; every seed's
     aggregator turns its M into weights [S, K] (``aggregate``: one batched solve); the shared
     parameters get weights @ G, per-task ones their own task's gradient; one Adam step over the
     stacked parameters, skipped on the device for every seed whose update is not finite; on the
     updates a method asks for (``Aggregator.learn_every``), its own learning (``learn``, given an
     ``Objective``: the losses as a function, the parameters before and after the step, the batch
     and a held-out one if it asked, the gradients, weights and Gramian);
  3. the same for the K actor losses (alpha_k log pi - min Q) against the updated critic;
  4. the temperatures (one per task, or one shared) from the actor's log-probabilities;
  5. Polyak averaging of the target critics.

The update (``SAC.update``) is a function of (state, batch, random numbers): it reads nothing
back to the host and keeps no Python-side state, and writes the new state into the state's
tensors in place. A non-finite critic skips that seed's whole update; a non-finite actor skips
everything of it but the critic's step, which came first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from ..aggregators import Aggregator, Objective, aggregate, make_aggregator
from ..buffers import Batch
from ..config import AgentConfig
from ..gradients import TaskGradients, over_seeds, task_gradient_fields
from ..runtime import maybe_compile
from .networks import Network, Params, make_network
from .optim import adam_init, adam_step, paired_leaves

State = dict[str, Any]  # a tree of tensors; the population's has a leading seed axis on every leaf
Split = dict[str, Params]  # {"shared": ..., "task": ...} parameters of one network pair
TASK_AXIS = {"shared": None, "task": 0}  # vmap over tasks: per-task parameters are sliced, shared ones not


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses persist for too many consecutive updates."""


class TanhGaussianPolicy:
    """Tanh-squashed Gaussian policy; the network outputs the mean and log-std of each action."""

    def __init__(self, net: Network, log_std_min: float, log_std_max: float) -> None:
        self.net, self.log_std_min, self.log_std_max = net, log_std_min, log_std_max

    def init(self, generator: torch.Generator) -> Split:
        shared, task = self.net.init(generator)
        return {"shared": shared, "task": task}

    def _mean_log_std(self, shared: Params, task: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.net.forward_one(shared, task, obs).chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample_one(self, shared: Params, task: Params, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """One task: reparameterised action tanh(mean + std * noise) [B, A] and its log-prob [B]."""
        mean, log_std = self._mean_log_std(shared, task, obs)
        pre_tanh = mean + log_std.exp() * noise
        gaussian_log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2) written stably as 2 (log 2 - u - softplus(-2u))
        squash_correction = (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
        return torch.tanh(pre_tanh), gaussian_log_prob - squash_correction

    def mode_one(self, shared: Params, task: Params, obs: Tensor) -> Tensor:
        """One task: the deterministic action tanh(mean)."""
        return torch.tanh(self._mean_log_std(shared, task, obs)[0])

    def sample(self, params: Split, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """All tasks: obs [K, B, obs_dim], noise [K, B, A] -> actions [K, B, A], log-probs [K, B]."""
        return vmap(lambda p, o, n: self.sample_one(p["shared"], p["task"], o, n), in_dims=(TASK_AXIS, 0, 0))(
            params, obs, noise
        )

    def mode(self, params: Split, obs: Tensor) -> Tensor:
        return vmap(lambda p, o: self.mode_one(p["shared"], p["task"], o), in_dims=(TASK_AXIS, 0))(params, obs)


class TwinCritic:
    """Two Q networks Q(obs, action) (the minimum is used against over-estimation); their
    parameters are named ``q1.*`` and ``q2.*``."""

    def __init__(self, q1: Network, q2: Network) -> None:
        self.q1, self.q2 = q1, q2

    def init(self, generator: torch.Generator) -> Split:
        (s1, t1), (s2, t2) = self.q1.init(generator), self.q2.init(generator)
        return {"shared": {**_prefixed("q1", s1), **_prefixed("q2", s2)},
                "task": {**_prefixed("q1", t1), **_prefixed("q2", t2)}}  # fmt: skip

    def forward_one(self, shared: Params, task: Params, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """One task: Q1, Q2 of shape [B]."""
        x = torch.cat([obs, action], dim=-1)
        q1 = self.q1.forward_one(_under("q1", shared), _under("q1", task), x)
        q2 = self.q2.forward_one(_under("q2", shared), _under("q2", task), x)
        return q1.squeeze(-1), q2.squeeze(-1)

    def __call__(self, params: Split, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """All tasks: obs [K, B, obs_dim], action [K, B, A] -> Q1, Q2 [K, B]."""
        return vmap(lambda p, o, a: self.forward_one(p["shared"], p["task"], o, a), in_dims=(TASK_AXIS, 0, 0))(
            params, obs, action
        )


def _prefixed(prefix: str, params: Params) -> Params:
    return {f"{prefix}.{name}": p for name, p in params.items()}


def _under(prefix: str, params: Params) -> Params:
    start = len(prefix) + 1
    return {name[start:]: p for name, p in params.items() if name.startswith(prefix + ".")}


# -- the three batched passes of one agent (vmapped over seeds by ``SAC``) -----------------------
def soft_td_target(
    actor: TanhGaussianPolicy, critic: TwinCritic, gamma: float, actor_params: Split, target_params: Split,
    next_obs: Tensor, reward: Tensor, terminated: Tensor, noise: Tensor, alpha: Tensor,
) -> Tensor:  # fmt: skip
    """[K, B]: r + gamma (1 - terminated) (min_i Q_target_i(s', a') - alpha_k log pi(a'|s')),
    a' ~ pi(.|s') by the reparameterised ``noise``."""
    next_action, next_log_prob = actor.sample(actor_params, next_obs, noise)
    target_q1, target_q2 = critic(target_params, next_obs, next_action)
    soft_value = torch.min(target_q1, target_q2) - alpha[:, None] * next_log_prob
    return reward + gamma * (1.0 - terminated) * soft_value


def critic_task_loss(critic: TwinCritic) -> Callable:
    """One task's critic loss: the twin critics' squared TD errors on (obs, action, td_target)."""

    def critic_loss(shared, task, task_batch):
        obs, action, target = task_batch
        q1, q2 = critic.forward_one(shared, task, obs, action)
        return ((q1 - target) ** 2).mean() + ((q2 - target) ** 2).mean()

    return critic_loss


def actor_task_loss(actor: TanhGaussianPolicy, critic: TwinCritic, critic_shared: Params) -> Callable:
    """One task's actor loss alpha_k log pi - min Q against a constant critic, on (obs, noise,
    alpha_k, the critic's task parameters); aux: the mean log-probability (for the temperature)."""

    def actor_loss(shared, task, task_batch):
        obs, noise_k, alpha_k, critic_task_k = task_batch
        action, log_prob = actor.sample_one(shared, task, obs, noise_k)
        q1, q2 = critic.forward_one(critic_shared, critic_task_k, obs, action)
        return (alpha_k * log_prob - torch.min(q1, q2)).mean(), log_prob.mean()

    return actor_loss


def critic_gradients(critic: TwinCritic, params: Split, obs: Tensor, action: Tensor, td_target: Tensor) -> tuple:
    """Per-task gradients of the critic losses (``task_gradient_fields``)."""
    return task_gradient_fields(critic_task_loss(critic), params["shared"], params["task"], (obs, action, td_target))


def actor_gradients(
    actor: TanhGaussianPolicy, critic: TwinCritic, params: Split, critic_params: Split, obs: Tensor,
    noise: Tensor, alpha: Tensor,
) -> tuple:  # fmt: skip
    """Per-task gradients of the actor losses; aux: the mean log-probability per task."""
    loss = actor_task_loss(actor, critic, critic_params["shared"])
    batch = (obs, noise, alpha, critic_params["task"])
    return task_gradient_fields(loss, params["shared"], params["task"], batch, has_aux=True)


def temperature_gradient(mean_log_prob: Tensor, target_entropy: float, shared: bool) -> Tensor:
    """The gradient of the temperature loss -log_alpha_k (mean log pi_k + target entropy) with
    respect to log_alpha: per task [..., K], or for one shared log_alpha [..., 1] (the mean over
    tasks). Written out: no autograd graph for K numbers."""
    gap = mean_log_prob + target_entropy
    return -gap.mean(-1, keepdim=True) if shared else -gap


def min_pairwise_cosine(gramian: Tensor) -> Tensor:
    """[..., K, K] -> [...]: the smallest cosine similarity between two different task gradients
    (nan for K = 1)."""
    k = gramian.shape[-1]
    if k < 2:
        return gramian.new_full(gramian.shape[:-2], float("nan"))
    norms = torch.sqrt(torch.clamp(torch.diagonal(gramian, dim1=-2, dim2=-1), min=1e-30))
    cosine = gramian / (norms[..., :, None] * norms[..., None, :])
    diagonal = torch.eye(k, dtype=torch.bool, device=gramian.device)
    return torch.where(diagonal, torch.inf, cosine).amin(dim=(-2, -1))  # a boolean mask would sync


def count_skips(skip_counts: Tensor, applied: Tensor) -> None:
    """In place: skip_counts [S, 3] (skipped updates in all, in a row now, the longest run in a
    row so far) after an update whose ``applied`` [S] says which seeds stepped."""
    skipped = (~applied).to(torch.int64)
    total, streak, longest = skip_counts.unbind(-1)
    streak = (streak + 1) * skipped
    skip_counts.copy_(torch.stack([total + skipped, streak, torch.maximum(longest, streak)], dim=-1))


def copy_tree_(dst: Any, src: Any) -> None:
    """In place: every tensor of ``dst`` takes the value of its twin in ``src``."""
    for d, s in paired_leaves(dst, src):
        d.copy_(s)


class Learning(NamedTuple):
    """What a method's ``learn`` needs of one network's update beyond its gradients (seed axis
    first): what the network's loss depends on besides its parameters (the actor: the critic), the
    per-task training batch, and a held-out batch of the same form (None unless asked for)."""

    context: Any
    batch: tuple
    held_out: tuple | None


def loss_only(task_loss: Callable) -> Callable:
    """A task loss with an aux output, without it."""
    return lambda *args: task_loss(*args)[0]


class SAC:
    """The parts of a multi-task SAC agent that do not change while it trains: its networks,
    hyperparameters and aggregation method. Its state lives apart (``init_state``), with a
    leading seed axis when a population runs it (``update``, ``act``)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        tasks: list[str],
        cfg: AgentConfig,
        method: str,
        method_options: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        """``tasks``: the task names, in order. ``compile``: run the update's batched passes through
        ``torch.compile`` (train.compile). Bad architecture options raise ValueError."""
        self.cfg, self.tasks, self.num_tasks, self.action_dim = cfg, list(tasks), len(tasks), action_dim
        options = cfg.architecture_options.get(cfg.architecture, {})

        def network(extra_dim: int, out_dim: int) -> Network:
            return make_network(cfg.architecture, obs_dim, extra_dim, out_dim, self.tasks, list(cfg.hidden_sizes),
                                cfg.init, options)  # fmt: skip

        self.actor = TanhGaussianPolicy(network(0, 2 * action_dim), cfg.log_std_min, cfg.log_std_max)
        self.critic = TwinCritic(network(action_dim, 1), network(action_dim, 1))
        self.aggregator: Aggregator = make_aggregator(method, **(method_options or {}))
        self.aggregator.bind_tasks(self.tasks)
        self.shared_temperature = cfg.temperature == "shared"
        self.target_entropy = -float(action_dim) if cfg.target_entropy is None else float(cfg.target_entropy)
        self.compiled = compile
        # The three batched passes, over the seed axis of every argument.
        td_target = functools.partial(soft_td_target, self.actor, self.critic, cfg.gamma)
        self.td_target_pass = maybe_compile(vmap(td_target), compile)
        self.critic_pass = maybe_compile(over_seeds(functools.partial(critic_gradients, self.critic)), compile)
        self.actor_pass = maybe_compile(
            over_seeds(functools.partial(actor_gradients, self.actor, self.critic)), compile
        )
        # The method's own learning (``Aggregator.learn``), over the seed axis, for each network:
        # its loss given the context (the critic's: none; the actor's: the updated critic).
        critic_loss = critic_task_loss(self.critic)
        self.learn_passes = {
            "critic": maybe_compile(functools.partial(self._learn_over_seeds, lambda _: critic_loss), compile),
            "actor": maybe_compile(functools.partial(self._learn_over_seeds, self._actor_loss_given), compile),
        }

    def describe(self) -> dict[str, Any]:
        """The networks, for run.json: architecture, options, and what the architecture adds."""
        options = self.cfg.architecture_options.get(self.cfg.architecture, {})
        return {"architecture": self.cfg.architecture, "options": options, **self.actor.net.describe()}

    # -- state ----------------------------------------------------------------------------------
    def init_state(self, seed: int) -> State:
        """One agent's fresh state (on the CPU): networks drawn from a generator seeded with
        ``seed``, so a seed starts from the same numbers alone or in any population."""
        generator = torch.Generator().manual_seed(seed)
        actor, critic = self.actor.init(generator), self.critic.init(generator)
        n_temps = 1 if self.shared_temperature else self.num_tasks
        log_alpha = torch.full((n_temps,), math.log(self.cfg.init_temperature))
        return {
            "actor": actor,
            "critic": critic,
            "critic_target": tree_map(torch.clone, critic),
            "log_alpha": log_alpha,
            "optim": {"actor": adam_init(actor), "critic": adam_init(critic), "temperature": adam_init(log_alpha)},
            "aggregators": {name: self.aggregator.init_state(self.num_tasks) for name in ("critic", "actor")},
            # skipped (non-finite) updates: in all, in a row now, the longest run in a row so far
            "skip_counts": torch.zeros(3, dtype=torch.int64),
        }

    def temperatures(self, state: State) -> Tensor:
        """[S, K]: the temperature each seed's task uses."""
        log_alpha = state["log_alpha"]
        return log_alpha.exp().expand(log_alpha.shape[0], self.num_tasks)

    # -- acting ---------------------------------------------------------------------------------
    def act(self, state: State, obs: Tensor, noise: Tensor | None) -> Tensor:
        """obs [S, K, obs_dim] (one env per seed and task) -> actions [S, K, A] in [-1, 1]:
        the policy's sample for ``noise`` [S, K, A], or its mode when ``noise`` is None."""
        actor = self.actor
        obs = obs[:, :, None]
        if noise is None:
            return vmap(actor.mode)(state["actor"], obs)[:, :, 0]
        return vmap(lambda p, o, n: actor.sample(p, o, n)[0])(state["actor"], obs, noise[:, :, None])[:, :, 0]

    # -- one update -----------------------------------------------------------------------------
    def update(
        self, state: State, batch: Batch, noise: Tensor, uniform: Tensor, diagnostics: bool, learn: bool = False,
        held_out: Batch | None = None, held_out_noise: Tensor | None = None,
    ) -> dict[str, Tensor]:  # fmt: skip
        """One SAC update of every seed on its own batch ([S, K, B, ...]), in place on ``state``.

        ``noise`` [S, 2, K, B, A]: standard normal numbers for the TD target's and the actor's
        actions; ``uniform`` [S, 2, K, K]: the critic's and the actor's aggregator's random
        numbers. Returns metric tensors [S, ...] and ``applied`` [S], False where a seed's update
        was skipped because a loss or gradient was not finite. ``diagnostics`` adds the smallest
        cosine between two task gradients (it needs the Gramian even for ``ls``). ``learn``: the
        aggregator's ``learn`` runs on this update, with ``held_out`` (a second batch, with its
        own ``held_out_noise``) if it asked for one (``needs_held_out``).
        """
        alpha = self.temperatures(state)
        td_target = self.td_target_pass(
            state["actor"], state["critic_target"], batch.next_obs, batch.reward, batch.terminated, noise[:, 0], alpha
        )
        critic = TaskGradients(*self.critic_pass(state["critic"], batch.obs, batch.action, td_target))
        critic_ok = torch.isfinite(critic.total())  # [S]
        critic_learning = None
        if learn:
            critic_held_out = None
            if held_out is not None:
                held_out_td = self.td_target_pass(state["actor"], state["critic_target"], held_out.next_obs,
                                                  held_out.reward, held_out.terminated, held_out_noise[:, 0],
                                                  alpha)  # fmt: skip
                critic_held_out = (held_out.obs, held_out.action, held_out_td)
            critic_learning = Learning(None, (batch.obs, batch.action, td_target), critic_held_out)
        critic_weights, critic_gram = self._descend(state, "critic", critic, critic_ok, uniform[:, 0], diagnostics,
                                                    critic_learning)  # fmt: skip

        # The updated critic enters the actor's loss as a constant (its tensors need no gradient).
        actor = TaskGradients(*self.actor_pass(state["actor"], state["critic"], batch.obs, noise[:, 1], alpha))
        applied = critic_ok & torch.isfinite(actor.total())
        actor_learning = None
        if learn:
            critic_task = state["critic"]["task"]
            actor_held_out = None if held_out is None else (held_out.obs, held_out_noise[:, 1], alpha, critic_task)
            actor_learning = Learning(state["critic"], (batch.obs, noise[:, 1], alpha, critic_task), actor_held_out)
        actor_weights, actor_gram = self._descend(state, "actor", actor, applied, uniform[:, 1], diagnostics,
                                                  actor_learning)  # fmt: skip
        grad = temperature_gradient(actor.aux, self.target_entropy, self.shared_temperature)
        adam_step(state["log_alpha"], grad, state["optim"]["temperature"], applied, self.cfg.temperature_lr)
        weight = (self.cfg.tau * applied).to(alpha.dtype)  # zero where skipped: the target stays
        for target, source in paired_leaves(state["critic_target"], state["critic"]):
            target.lerp_(source, weight.view(-1, *[1] * (target.ndim - 1)))
        count_skips(state["skip_counts"], applied)

        metrics = {
            "critic_loss": critic.losses,
            "actor_loss": actor.losses,
            "temperature": self.temperatures(state),
            "entropy": -actor.aux,
            "critic_weights": critic_weights,
            "actor_weights": actor_weights,
            "applied": applied,
        }
        if critic_gram is not None and actor_gram is not None:
            metrics["critic_min_cosine"] = min_pairwise_cosine(critic_gram)
            metrics["actor_min_cosine"] = min_pairwise_cosine(actor_gram)
        return metrics

    def _descend(
        self, state: State, network: str, grads: TaskGradients, ok: Tensor, uniform: Tensor, diagnostics: bool,
        learning: Learning | None,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Aggregate ``network``'s per-task gradients and take its Adam step (skipped where ``ok``
        [S] is False), then, with ``learning``, the method's ``learn``: returns the weights [S, K]
        and the Gramians [S, K, K] (None: not computed). Independent networks share nothing:
        their weights are all ones, and there is nothing for a method to learn."""
        agg = self.aggregator
        gramian = grads.gramian() if grads.shared and (agg.uses_gramian or diagnostics) else None
        params = state[network]
        before = None
        if grads.shared:
            agg_state = state["aggregators"][network]
            weights, new_state = aggregate(agg, gramian if agg.uses_gramian else None, grads.losses, agg_state,
                                           uniform)  # fmt: skip
            copy_tree_(agg_state, new_state)
            if learning is not None:
                before = tree_map(torch.clone, params)  # the parameters the gradients were taken at
        else:
            weights = torch.ones_like(grads.losses)
        step = {"shared": grads.combine(weights), "task": grads.task_specific}
        lr = self.cfg.critic_lr if network == "critic" else self.cfg.actor_lr
        adam_step(params, step, state["optim"][network], ok, lr)
        if before is not None:
            # dicts, not tuples: vmap under dynamo spreads a tuple argument into several
            inputs = {**learning._asdict(), "gradients": grads.shared, "losses": grads.losses, "weights": weights,
                      "gramian": gramian}  # fmt: skip
            learned = self.learn_passes[network](agg_state, before, params, inputs)
            copy_tree_(agg_state, learned)
        return weights, gramian

    # -- the method's learning, one seed ----------------------------------------------------------
    def _actor_loss_given(self, critic_params: Split) -> Callable:
        return loss_only(actor_task_loss(self.actor, self.critic, critic_params["shared"]))

    def _learn_over_seeds(self, task_loss_of: Callable, *args: Any) -> dict[str, Tensor]:
        """``_learn_one`` for every seed: ``vmap`` over the seed axis of every tensor argument
        (None stays None: no held-out batch, no Gramian, no context)."""
        in_dims = tree_map(lambda leaf: None if leaf is None else 0, args)
        return vmap(functools.partial(self._learn_one, task_loss_of), in_dims=in_dims)(*args)

    def _learn_one(self, task_loss_of: Callable, agg_state: dict[str, Tensor], params: Split, stepped: Split,
                   inputs: dict[str, Any]) -> dict[str, Tensor]:  # fmt: skip
        """One seed: ``inputs`` holds the ``Learning`` fields and this update's gradients, losses,
        weights and Gramian."""
        objective = Objective(task_loss_of(inputs["context"]), params, stepped, inputs["batch"], inputs["held_out"],
                              inputs["gradients"], inputs["losses"], inputs["weights"], inputs["gramian"])  # fmt: skip
        return self.aggregator.learn(agg_state, objective)
