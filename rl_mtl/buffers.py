"""The replay of a population: [S, K, C, ...] ring buffers on the training device, sampled as
[S, K, B, ...] with one generator per seed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """Transitions for K tasks, B per task (with a leading seed axis [S, ...] when they come from
    a population's replay). ``terminated`` stops bootstrapping; truncation does not."""

    obs: Tensor  # [S, K, B, obs_dim]
    action: Tensor  # [S, K, B, action_dim]
    reward: Tensor  # [S, K, B]
    next_obs: Tensor  # [S, K, B, obs_dim]
    terminated: Tensor  # [S, K, B], 1.0 where the episode really ended (no bootstrap)


FIELDS = tuple(f.name for f in fields(Batch))


class ReplayError(RuntimeError):
    """The replay does not fit in the training device's memory, with what to lower."""


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give (None when unknown): the GPU's free memory, or the
    host's available memory (``MemAvailable``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ReplayBuffer:
    """One ring buffer of ``capacity`` transitions per seed and task, written together (every
    seed steps one env per task at a time). Storage and sampling stay on ``device``; each seed
    draws its indices from its own generator (seeded with ``seeds[s]``), so a seed samples the
    same batches alone or in any population, and one gather serves all seeds."""

    def __init__(
        self, seeds: list[int], num_tasks: int, capacity: int, obs_dim: int, action_dim: int, device: torch.device
    ) -> None:
        self.num_tasks, self.capacity, self.device = num_tasks, capacity, device
        lead = (len(seeds), num_tasks, capacity)
        widths = {"obs": obs_dim, "action": action_dim, "reward": None, "next_obs": obs_dim, "terminated": None}
        need = 4 * len(seeds) * num_tasks * capacity * (2 * obs_dim + action_dim + 2)  # float32
        free = free_memory(device)
        advice = "lower train.buffer_capacity_per_task, or train fewer seeds together"
        if free is not None and need > free:
            raise ReplayError(
                f"the replay needs {need / 2**30:.1f} GiB ({len(seeds)} seeds x {num_tasks} tasks x {capacity} "
                f"transitions) but {device} has {free / 2**30:.1f} GiB free; {advice}"
            )
        try:
            self.storage = {
                name: torch.zeros(*lead, *([] if width is None else [width]), device=device)
                for name, width in widths.items()
            }
        except (torch.OutOfMemoryError, RuntimeError) as err:  # the check above is an estimate
            raise ReplayError(
                f"the replay ({need / 2**30:.1f} GiB) does not fit on {device} ({err}); {advice}"
            ) from err
        self.position = 0  # the next slot to write (the same for every seed and task)
        self.size = 0
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __len__(self) -> int:
        return self.size

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor) -> None:
        """One transition per seed and task: obs [S, K, obs_dim], action [S, K, A], reward [S, K], ..."""
        for name, value in zip(FIELDS, (obs, action, reward, next_obs, terminated), strict=True):
            self.storage[name][:, :, self.position] = value
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_per_task: int) -> Batch:
        """B transitions per seed and task, uniform with replacement over the filled slots."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        shape = (self.num_tasks, batch_per_task)
        idx = torch.stack([torch.randint(self.size, shape, generator=g, device=self.device) for g in self.generators])
        return Batch(*(gather_slots(self.storage[name], idx) for name in FIELDS))

    # -- one seed's part of a checkpoint ----------------------------------------------------------
    def seed_state(self, s: int) -> dict[str, Any]:
        """Seed ``s``'s transitions (the filled part only) and generator, on the CPU."""
        n = self.size  # the ring has not wrapped while size < capacity
        return {
            **{name: self.storage[name][s, :, :n].cpu() for name in FIELDS},
            "position": self.position,
            "size": self.size,
            "generator": self.generators[s].get_state(),
        }

    def load_seed_state(self, s: int, state: dict[str, Any]) -> None:
        n = int(state["size"])
        if n > self.capacity:
            raise ValueError(f"the checkpointed replay holds {n} transitions per task, its capacity is {self.capacity}")
        for name in FIELDS:
            self.storage[name][s, :, :n] = state[name].to(self.device)
        self.position, self.size = int(state["position"]), n
        self.generators[s].set_state(state["generator"])


def gather_slots(storage: Tensor, idx: Tensor) -> Tensor:
    """storage [..., C] or [..., C, D], idx [..., B] -> the chosen slots [..., B] / [..., B, D]."""
    dim = idx.ndim - 1
    if storage.ndim == idx.ndim:
        return torch.gather(storage, dim, idx)
    return torch.gather(storage, dim, idx[..., None].expand(*idx.shape, storage.shape[-1]))
