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

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor) -> None:
        """One transition per task: obs [K, obs_dim], action [K, A], reward [K], ..."""
        i = self.position
        self.obs[:, i] = obs
        self.action[:, i] = action
        self.reward[:, i] = reward
        self.next_obs[:, i] = next_obs
        self.terminated[:, i] = terminated
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_per_task: int) -> Batch:
        """B transitions per task, drawn uniformly with replacement from that task's buffer."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (self.num_tasks, batch_per_task), generator=self.generator, device=self.device)

        def take(t: Tensor) -> Tensor:
            if t.ndim == 2:
                return torch.gather(t, 1, idx)
            return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))

        return Batch(take(self.obs), take(self.action), take(self.reward), take(self.next_obs), take(self.terminated))

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
