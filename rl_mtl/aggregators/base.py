"""The aggregator interface: a K x K Gramian of task gradients (+ losses) -> K weights, and one
hook for methods that learn from more than that.

An aggregator object holds its options only. Its state (the fallback count; Nash-MTL's reused
weights and call counter) is an explicit dict of tensors that ``weigh`` takes and returns, and
its only randomness is ``uniform``, K x K numbers uniform on [0, 1) drawn by the caller from its
own seeded generator (PCGrad turns them into task orders; the other methods ignore them). So a
call is a pure function: ``aggregate`` runs S seeds' aggregators as one ``vmap`` and a training
update compiles whole.

A method that needs more than the Gramian and the losses (AuxiNash: a main task's held-out
gradient; FAMO: the losses after the step; GradNorm: one layer's gradient norms; uncertainty
weighting: parameters of its own) declares it in class attributes and implements ``learn``,
which the update calls every ``learn_every`` updates, after the network's optimiser step, with
an ``Objective``: the task losses as a function, the parameters before and after the step, the
batch (and a held-out one if ``needs_held_out``), the gradients, weights and Gramian. Its learned
quantities live in its state. The trainer never needs to know which method it runs.

Every method works in float64 on the Gramian's device, whatever the input dtype, because the
Gramians of RL gradients span many orders of magnitude (1e-15 .. 1e15 in practice) and K is small.
Nothing here reads a value back to the host on the sync-free path (``solvers.may_read_back``):
degenerate cases are handled with ``torch.where`` and counted in the state's ``fallbacks``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

from .. import registry
from .solvers import may_read_back

State = dict[str, Tensor]
Params = dict[str, Tensor]


class AggregatorError(ValueError):
    """A bad aggregator name, option value or input, with a message that says how to fix it."""


# Option checks raise AggregatorError (the registry's checks, shared with the architectures).
check_option = functools.partial(registry.check_option, error=AggregatorError)
check_choice = functools.partial(registry.check_choice, error=AggregatorError)


def check_gramian(gramian: Tensor, losses: Tensor | None) -> int:
    """Validate shapes (never values: that would need a host sync); return K."""
    if not isinstance(gramian, Tensor) or gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        shape = tuple(gramian.shape) if isinstance(gramian, Tensor) else type(gramian).__name__
        raise AggregatorError(f"gramian must be a square [K, K] tensor, got {shape}")
    k = gramian.shape[0]
    if k < 1:
        raise AggregatorError("gramian must have at least one task (K >= 1)")
    if losses is not None and tuple(losses.shape) != (k,):
        raise AggregatorError(f"losses must have shape [{k}] to match the gramian, got {tuple(losses.shape)}")
    return k


def normalize_gramian(gramian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Divide M by its mean diagonal (the mean squared task-gradient norm).

    Returns (A, scale, degenerate): A has mean diagonal 1, so solvers see O(1) numbers whatever
    the scale of the gradients; ``degenerate`` is True when every task gradient is zero (then A is
    the identity and the caller's weights only matter up to the zero direction).
    """
    k = gramian.shape[0]
    scale = torch.diagonal(gramian).sum() / k
    degenerate = ~(scale > torch.finfo(gramian.dtype).tiny)
    eye = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
    safe_scale = torch.where(degenerate, torch.ones_like(scale), scale)
    a = torch.where(degenerate, eye, gramian / safe_scale)
    return 0.5 * (a + a.T), safe_scale, degenerate


@dataclass
class Objective:
    """What ``Aggregator.learn`` sees of one seed's update of one network (the actor or a critic),
    every tensor without the seed axis. ``task_loss(shared, task, task_batch)`` is one task's
    loss (``task``: that task's slice of the per-task parameters; ``task_batch``: its slice of a
    batch); ``params`` and ``stepped`` are ``{"shared": ..., "task": ...}`` before and after the
    optimiser step."""

    task_loss: Callable[..., Tensor]
    params: dict[str, Params]  # where the gradients were taken
    stepped: dict[str, Params]  # after the optimiser step
    batch: Any  # the training batch, a tuple of [K, B, ...] tensors
    held_out: Any  # a second batch like it, drawn for this call (None unless ``needs_held_out``)
    gradients: Params  # the shared parameters' per-task gradients: name -> [K, *shape]
    losses: Tensor  # [K] at ``params`` on ``batch``
    weights: Tensor  # [K] this update's weights
    gramian: Tensor | None  # [K, K] (None when neither the method nor the diagnostics need it)

    def task_losses(self, params: dict[str, Params], batch: Any) -> Tensor:
        """[K]: every task's loss at ``params`` on ``batch`` (e.g. ``stepped`` on ``batch``)."""
        return vmap(self.task_loss, in_dims=(None, 0, 0))(params["shared"], params["task"], batch)


class Aggregator:
    """Base class. Subclasses implement ``_weights(gramian64, losses, uniform) -> (weights64,
    fallback)``, a pure function of its inputs and the constructor's options.

    ``fallback`` is a 0-dim bool tensor: True when the method could not apply its definition as
    stated and used its documented fallback (see each method's docstring). Non-finite input or
    output always falls back to the mean (1/K each) and is counted too.

    ``weigh(gramian, losses, state, uniform)`` is the call the trainer makes (pure, one agent;
    ``aggregate`` runs it for a population of seeds). Calling the object, ``agg(gramian)``, is the
    same with the state and the uniform numbers kept inside the object: the library's form.
    """

    name: ClassVar[str] = ""
    uses_gramian: ClassVar[bool] = True  # False: the weights never depend on M (linear scalarisation)
    # False: ``weigh`` reads a result back to the host on CUDA, so it cannot run in a CUDA graph.
    graph_safe: ClassVar[bool] = True
    # What a method needs beyond the Gramian and the losses (module docstring):
    learn_every: int = 0  # > 0: ``learn`` runs on every learn_every-th update
    needs_held_out: ClassVar[bool] = False  # ``learn``'s Objective carries a held-out batch
    # Per-task state entries to log: state key -> scalar name ("<method>/<name>/<network>/<task>").
    logged_state: ClassVar[dict[str, str]] = {}

    def bind_tasks(self, tasks: list[str]) -> None:
        """Learn the run's task names (in order), for options that name tasks."""

    # -- the pure interface -----------------------------------------------------------------
    def init_state(self, k: int, device: torch.device | str = "cpu") -> State:
        """One agent's state before its first call."""
        return {"fallbacks": torch.zeros((), dtype=torch.int64, device=device)}

    def weigh(self, gramian: Tensor | None, losses: Tensor, state: State, uniform: Tensor) -> tuple[Tensor, State]:
        """One call: the weights [K] (in the Gramian's dtype, or the losses' without one) and the
        new state. ``gramian`` may be None only when the method does not use it (``uses_gramian``)."""
        weights, fallback = self.solve(gramian, losses, uniform)
        return weights, {**state, "fallbacks": state["fallbacks"] + fallback.to(torch.int64)}

    def learn(self, state: State, objective: Objective) -> State:
        """The method's own learning on one seed's update (``learn_every``): the new state."""
        return state

    def solve(self, gramian: Tensor | None, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, fallback) for one [K, K] Gramian, guarded: non-finite input or output gives
        the mean and counts as a fallback."""
        k = losses.shape[-1]
        dtype = losses.dtype if gramian is None else gramian.dtype
        mean = torch.full((k,), 1.0 / k, dtype=dtype, device=losses.device)
        if gramian is None:
            return mean, torch.zeros((), dtype=torch.bool, device=losses.device)
        m = gramian.detach().to(torch.float64)
        finite = torch.isfinite(m).all()
        eye = torch.eye(k, dtype=torch.float64, device=m.device)
        weights, fallback = self._weights(torch.where(finite, m, eye), losses.detach(), uniform)
        ok = finite & torch.isfinite(weights).all()
        return torch.where(ok, weights.to(dtype), mean), fallback | ~ok

    @property
    def on_device(self) -> bool:
        """Whether ``weigh`` runs on the device without host reads (False for the host-side
        reference solvers): then ``aggregate`` may vmap it and a training update may compile it."""
        return True

    def options(self) -> dict[str, Any]:
        """The constructor options this instance was built with (for logs and configs)."""
        return {}

    # -- for subclasses ----------------------------------------------------------------------
    def _weights(self, gramian: Tensor, losses: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @staticmethod
    def no_fallback(like: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.bool, device=like.device)

    # -- the library's stateful call -------------------------------------------------------------
    def __call__(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """``weigh`` with the state kept in this object and the uniform numbers drawn from its own
        CPU generator (seeded 0; ``state_dict`` holds both). A call with another number of tasks
        than the last starts the state afresh, keeping the fallback count."""
        k = check_gramian(gramian, losses)
        if losses is None:
            losses = torch.zeros(k, dtype=gramian.dtype, device=gramian.device)
        if getattr(self, "_state", None) is None:
            self._generator = torch.Generator().manual_seed(0)
            self._state, self._k = self.init_state(k, gramian.device), k
        elif self._k != k:
            self._state, self._k = {**self.init_state(k, gramian.device), "fallbacks": self._state["fallbacks"]}, k
        uniform = torch.rand(k, k, dtype=torch.float64, generator=self._generator).to(gramian.device)
        weights, self._state = self.weigh(gramian, losses, self._state, uniform)
        return weights

    @property
    def fallbacks(self) -> int:
        """How many calls used a fallback so far (reading it synchronises with the device)."""
        state = getattr(self, "_state", None)
        return 0 if state is None else int(state["fallbacks"])

    def state_dict(self) -> dict[str, Any]:
        return {"state": self._state, "k": self._k, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state, self._k = dict(state["state"]), state["k"]
        self._generator = torch.Generator()
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def aggregate(
    aggregator: Aggregator, gramians: Tensor | None, losses: Tensor, state: State, uniform: Tensor
) -> tuple[Tensor, State]:
    """S agents' calls of one aggregator, each on its own Gramian with its own state: gramians
    [S, K, K] (None when the method does not use them), losses [S, K], every state entry and
    uniform [S, K, K] with a leading seed axis -> (weights [S, K], new state).

    Where solvers run their whole budget anyway (the GPU, ``sync_free()``, a compiled update)
    all S solves are ONE ``vmap``, so S seeds cost the kernel launches of one solve. On the CPU a
    solve stops once converged, and one call per seed is faster for the few seeds a CPU trains
    together (2 seeds, Nash-MTL: 1.5 vs 5.5 ms; README: Benchmarks). Host-side solvers always
    run one call per seed. Either way the result is that of S separate calls, to rounding.
    """
    if aggregator.on_device and not may_read_back(losses):
        return vmap(aggregator.weigh, in_dims=(None if gramians is None else 0, 0, 0, 0))(
            gramians, losses, state, uniform
        )
    calls = [
        aggregator.weigh(None if gramians is None else gramians[s], losses[s], tree_map(lambda t, s=s: t[s], state),
                        uniform[s])
        for s in range(losses.shape[0])
    ]  # fmt: skip
    weights = torch.stack([w for w, _ in calls])
    return weights, {name: torch.stack([new[name] for _, new in calls]) for name in state}
