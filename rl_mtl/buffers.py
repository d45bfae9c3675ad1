"""Per-task replay buffers: preallocated tensors on the training device, sampled as [K, B, ...]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """Transitions for K tasks, B per task. ``terminated`` stops bootstrapping; truncation does not."""

    obs: Tensor  # [K, B, obs_dim]
    action: Tensor  # [K, B, action_dim]
    reward: Tensor  # [K, B]
    next_obs: Tensor  # [K, B, obs_dim]
    terminated: Tensor  # [K, B], 1.0 where the episode really ended (no bootstrap)


class MultiTaskReplayBuffer:
    """K ring buffers of equal capacity, one per task, written together (one env per task).

    Storage stays on ``device``; ``sample`` draws indices with a seeded generator on the same
    device, so the hot loop never leaves it.
    """

    def __init__(
        self, num_tasks: int, capacity: int, obs_dim: int, action_dim: int, device: torch.device, seed: int = 0
    ) -> None:
        self.num_tasks, self.capacity, self.device = num_tasks, capacity, device
        self.obs = torch.zeros(num_tasks, capacity, obs_dim, device=device)
        self.next_obs = torch.zeros(num_tasks, capacity, obs_dim, device=device)
        self.action = torch.zeros(num_tasks, capacity, action_dim, device=device)
        self.reward = torch.zeros(num_tasks, capacity, device=device)
        self.terminated = torch.zeros(num_tasks, capacity, device=device)
        self.position = 0  # next slot to write (same for every task)
        self.size = 0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    FIELDS = ("obs", "action", "reward", "next_obs", "terminated")

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor) -> None:
        """One transition per task: obs [K, obs_dim], action [K, A], reward [K], ..."""
        i = self.position
        self.obs[:, i] = obs
        self.action[:, i] = action
        self.reward[:, i] = reward
        self.next_obs[:, i] = next_obs
        self.terminated[:, i] = terminated
        self.advance()

    def advance(self) -> None:
        """Move past the slot just written."""
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def draw_indices(self, batch_per_task: int) -> Tensor:
        """[K, B] slots, uniform with replacement over each task's filled part."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        return torch.randint(self.size, (self.num_tasks, batch_per_task), generator=self.generator, device=self.device)

    def sample(self, batch_per_task: int) -> Batch:
        """B transitions per task, drawn uniformly with replacement from that task's buffer."""
        idx = self.draw_indices(batch_per_task)
        return Batch(*(gather_slots(getattr(self, name), idx) for name in self.FIELDS))

    def state_dict(self) -> dict[str, Any]:
        n = self.size  # only the filled part (the ring has not wrapped while size < capacity)
        return {
            "obs": self.obs[:, :n].cpu(),
            "next_obs": self.next_obs[:, :n].cpu(),
            "action": self.action[:, :n].cpu(),
            "reward": self.reward[:, :n].cpu(),
            "terminated": self.terminated[:, :n].cpu(),
            "position": self.position,
            "size": self.size,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        if n > self.capacity:
            raise ValueError(f"checkpointed buffer holds {n} transitions per task, capacity is {self.capacity}")
        for name in ("obs", "next_obs", "action", "reward", "terminated"):
            getattr(self, name)[:, :n] = state[name].to(self.device)
        self.position, self.size = int(state["position"]), n
        self.generator.set_state(state["generator"])


def gather_slots(storage: Tensor, idx: Tensor) -> Tensor:
    """storage [..., C] or [..., C, D], idx [..., B] -> the chosen slots [..., B] / [..., B, D]."""
    dim = idx.ndim - 1
    if storage.ndim == idx.ndim:
        return torch.gather(storage, dim, idx)
    return torch.gather(storage, dim, idx[..., None].expand(*idx.shape, storage.shape[-1]))


class StackedReplay:
    """The replay buffers of several seeds trained together, stored as [S, K, C, ...] tensors.

    Each seed's ``MultiTaskReplayBuffer`` stays complete (its own generator, counters and
    checkpoint) but its storage becomes a view of its slice of the stack; a seed draws its
    indices from its own generator exactly as it would alone, and one gather serves all seeds.
    """

    def __init__(self, buffers: list[MultiTaskReplayBuffer]) -> None:
        self.buffers = buffers
        self.storage: dict[str, Tensor] = {}
        for name in MultiTaskReplayBuffer.FIELDS:
            self.storage[name] = torch.stack([getattr(b, name) for b in buffers])
            for s, b in enumerate(buffers):
                setattr(b, name, self.storage[name][s])  # the seed's own tensor is freed

    def __len__(self) -> int:
        return len(self.buffers[0])

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor) -> None:
        """One transition per seed and task: obs [S, K, obs_dim], ... (all seeds step together)."""
        i = self.buffers[0].position
        for name, value in zip(MultiTaskReplayBuffer.FIELDS, (obs, action, reward, next_obs, terminated), strict=True):
            self.storage[name][:, :, i] = value
        for b in self.buffers:
            b.advance()

    def sample(self, batch_per_task: int) -> Batch:
        """[S, K, B, ...]: each seed's batch drawn with its own generator."""
        idx = torch.stack([b.draw_indices(batch_per_task) for b in self.buffers])
        return Batch(*(gather_slots(self.storage[name], idx) for name in MultiTaskReplayBuffer.FIELDS))
