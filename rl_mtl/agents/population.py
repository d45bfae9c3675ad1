"""A population: S independent SAC agents (seeds) of one config, trained as one.

Every tensor of the agents' state is stacked on a leading seed axis (parameters [S, ...],
optimiser moments, temperatures, target critics, aggregator state, skip counters), and one
update runs all of them: the per-task gradients of S x K tasks in one batched pass, S
aggregators' solves in one, one Adam step over the stacked parameters. A single run is S = 1 of
the same code. Each seed keeps its own random stream (a generator seeded with the seed: policy
noise and the aggregator's random numbers), so a seed's numbers are those it gets alone, up to
floating-point summation order inside batched kernels; its state can be sliced out
(``seed_state``) and put back (``load_seed_state``) to checkpoint and resume it alone or in any
population.

``compile`` (train.compile): "off" runs the update eagerly; "passes" compiles its three batched
passes (``SAC``); "whole" compiles the whole update as one graph (``fullgraph``: no breaks),
with the optimiser steps, the solvers (their fixed budgets: no read-backs under compilation) and
the metric sums' in-place adds; "graphs" also captures it as a CUDA graph and replays it
(torch.compile's ``reduce-overhead`` mode): every tensor the update writes (the state, the sums)
is marked as living at a fixed address, and each update's inputs (the batch, the random numbers,
drawn outside the graph from each seed's generator) are copied into the graph's input buffers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from ..buffers import Batch
from ..runtime import compile_graph
from .optim import paired_leaves
from .sac import SAC, State
from .sums import MetricSums


class Population:
    def __init__(self, sac: SAC, seeds: list[int], device: torch.device, compile: str = "off") -> None:
        self.sac, self.seeds, self.device, self.compile = sac, list(seeds), device, compile
        agents = [sac.init_state(seed) for seed in seeds]
        self.state: State = tree_map(lambda *leaves: torch.stack(leaves).to(device), *agents)
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self._update_fn = self._update_and_sum
        if compile in ("whole", "graphs"):
            mode = "reduce-overhead" if compile == "graphs" else None
            self._update_fn = compile_graph(self._update_and_sum, mode)

    @property
    def size(self) -> int:
        return len(self.seeds)

    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """obs [S, K, obs_dim] -> actions [S, K, A]: each seed's policy, sampled with its own
        noise, or its deterministic action (the tanh of the Gaussian mean)."""
        noise = None if deterministic else self._normal((self.sac.num_tasks, self.sac.action_dim))
        return self.sac.act(self.state, obs, noise)

    def policy(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic policy on the environments' observations [S, K, obs_dim] (numpy):
        the actions [S, K, A] to step them with (what evaluation runs)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return to_host(self.act(obs_t, deterministic=True))

    def update(self, batch: Batch, diagnostics: bool = False, learn: bool = False, held_out: Batch | None = None,
               sums: MetricSums | None = None) -> dict[str, Tensor]:  # fmt: skip
        """One SAC update of every seed on its own batch [S, K, B, ...] (``SAC.update``), added into
        ``sums`` when given; ``learn``: the method's own learning runs on it, with ``held_out``
        data if it asked for them. Returns the update's metrics (under CUDA graphs, valid until
        the next update)."""
        noise, uniform, held_out_noise = self.random_numbers(batch, held_out)
        if self.compile == "graphs":  # written in place by the graph: kept where they are (a cheap mark)
            for t in [*tree_leaves(self.state), *([] if sums is None else sums.tensors())]:
                torch._dynamo.mark_static_address(t)
            torch.compiler.cudagraph_mark_step_begin()  # the last update's outputs are not read again
        return self._update_fn(self.state, sums, batch, noise, uniform, diagnostics, learn, held_out, held_out_noise)

    def _update_and_sum(self, state: State, sums: MetricSums | None, batch: Batch, noise: Tensor, uniform: Tensor,
                        diagnostics: bool, learn: bool, held_out: Batch | None, held_out_noise: Tensor | None
                        ) -> dict[str, Tensor]:  # fmt: skip
        """The update as one function of tensors (what "whole" and "graphs" compile)."""
        metrics = self.sac.update(state, batch, noise, uniform, diagnostics, learn, held_out, held_out_noise)
        if sums is not None:
            sums.add_(metrics)
        return metrics

    def random_numbers(self, batch: Batch, held_out: Batch | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """An update's random numbers, each seed's from its own generator (outside any compiled
        graph): the policy noise [S, 2, K, B, A], the aggregators' uniform numbers [S, 2, K, K]
        (float64) and the held-out batch's noise (None without ``held_out``)."""
        _, k, b = batch.reward.shape
        noise = self._normal((2, k, b, self.sac.action_dim))
        uniform = torch.stack([
            torch.rand(2, k, k, dtype=torch.float64, generator=g, device=self.device) for g in self.generators
        ])  # fmt: skip
        held_out_noise = None if held_out is None else self._normal((2, k, b, self.sac.action_dim))
        return noise, uniform, held_out_noise

    def _normal(self, shape: tuple[int, ...]) -> Tensor:
        """[S, *shape]: standard normal numbers, each seed's from its own generator."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    # -- counters (reading them synchronises with the device) ------------------------------------
    def skip_counts(self) -> list[tuple[int, int, int]]:
        """Per seed: (skipped updates in all, in a row now, the longest run in a row)."""
        return [tuple(row) for row in self.state["skip_counts"].tolist()]

    def fallbacks(self, network: str) -> list[int]:
        """Per seed: the calls of ``network``'s aggregator that used a fallback."""
        return self.state["aggregators"][network]["fallbacks"].tolist()

    def method_state(self) -> dict[str, np.ndarray]:
        """The aggregator state its method logs (``Aggregator.logged_state``), per network, as
        scalar prefixes ("<method>/<name>/<network>") -> [S, K]."""
        agg = self.sac.aggregator
        return {
            f"{agg.name}/{name}/{network}": self.state["aggregators"][network][key].cpu().numpy()
            for key, name in agg.logged_state.items()
            for network in ("critic", "actor")
        }

    # -- one seed's part of a checkpoint ----------------------------------------------------------
    def seed_state(self, s: int) -> dict[str, Any]:
        """Seed ``s``'s agent (every tensor on the CPU) and its generator's state."""
        return {"agent": tree_map(lambda t: t[s].cpu(), self.state), "generator": self.generators[s].get_state()}

    def load_seed_state(self, s: int, state: dict[str, Any]) -> None:
        """Put a ``seed_state`` (of an agent of the same architecture) into slot ``s``."""
        for mine, theirs in paired_leaves(self.state, state["agent"]):
            mine[s].copy_(theirs)
        self.generators[s].set_state(state["generator"])


def to_host(action: Tensor) -> np.ndarray:
    """Actions for the environments (float64 numpy)."""
    return action.cpu().numpy().astype(np.float64)
