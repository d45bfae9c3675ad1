"""Multi-task MLPs whose layers are shared by all tasks or stacked one per task.

Each network is written once, for ONE task (``forward_one(shared, task, x)`` with ``task``
holding that task's slice of the per-task parameters); the batched forward over [K, B, ...]
and the per-task gradients are both ``torch.func.vmap`` over that function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

Params = dict[str, Tensor]
SplitParams = tuple[Params, Params]  # (shared, per-task [K, ...])


def _init_linear(weight: Tensor, bias: Tensor, scheme: str) -> None:
    """Initialise one [out, in] layer: PyTorch's nn.Linear default, or Xavier-uniform + zero bias."""
    if scheme == "xavier":
        nn.init.xavier_uniform_(weight)
        nn.init.zeros_(bias)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.``, with the prefix removed."""
    start = len(prefix) + 1
    return {name[start:]: p for name, p in params.items() if name.startswith(prefix + ".")}


class MultiTaskMLP(nn.Module):
    """ReLU MLP for K tasks. ``per_task``: "none" (all layers shared), "head" (last layer per
    task: a multi-head network) or "all" (every layer per task: independent networks)."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_sizes: list[int], num_tasks: int, per_task: str, init: str
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_sizes, out_dim]
        self.num_layers = len(dims) - 1
        last = self.num_layers - 1
        self.task_layers = {
            i for i in range(self.num_layers) if per_task == "all" or (per_task == "head" and i == last)
        }
        self.task_param_names: set[str] = set()
        for layer in range(self.num_layers):
            d_in, d_out = dims[layer], dims[layer + 1]
            stacked = layer in self.task_layers
            weight = torch.empty((num_tasks, d_out, d_in) if stacked else (d_out, d_in))
            bias = torch.empty((num_tasks, d_out) if stacked else (d_out,))
            for w, b in zip(weight if stacked else [weight], bias if stacked else [bias], strict=True):
                _init_linear(w, b, init)
            self.register_parameter(f"weight{layer}", nn.Parameter(weight))
            self.register_parameter(f"bias{layer}", nn.Parameter(bias))
            if stacked:
                self.task_param_names |= {f"weight{layer}", f"bias{layer}"}

    def split(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """(shared parameters, per-task parameters [K, ...]) by name."""
        shared, task = {}, {}
        for name, p in self.named_parameters():
            (task if name in self.task_param_names else shared)[name] = p
        return shared, task

    def forward_one(self, shared: Params, task: Params, x: Tensor) -> Tensor:
        """One task: x [..., in_dim] -> [..., out_dim]."""
        for layer in range(self.num_layers):
            src = task if layer in self.task_layers else shared
            x = F.linear(x, src[f"weight{layer}"], src[f"bias{layer}"])
            if layer < self.num_layers - 1:
                x = F.relu(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """All tasks: x [K, B, in_dim] -> [K, B, out_dim]."""
        shared, task = self.split()
        return vmap(self.forward_one, in_dims=(None, 0, 0))(shared, task, x)


def per_task_mode(architecture: str) -> str:
    return {"shared": "none", "multihead": "head", "independent": "all"}[architecture]


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy; the MLP outputs the mean and log-std of each action."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: list[int],
        num_tasks: int,
        architecture: str,
        init: str,
        log_std_min: float,
        log_std_max: float,
    ) -> None:
        super().__init__()
        self.net = MultiTaskMLP(obs_dim, 2 * action_dim, hidden_sizes, num_tasks, per_task_mode(architecture), init)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def split(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        shared, task = self.net.split()
        return {f"net.{k}": v for k, v in shared.items()}, {f"net.{k}": v for k, v in task.items()}

    def _mean_log_std(self, shared: Params, task: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net.forward_one(sub_params(shared, "net"), sub_params(task, "net"), obs)
        mean, log_std = out.chunk(2, dim=-1)
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

    def sample(self, obs: Tensor, noise: Tensor, params: SplitParams | None = None) -> tuple[Tensor, Tensor]:
        """All tasks: obs [K, B, obs_dim], noise [K, B, A] -> actions [K, B, A], log-probs [K, B].
        ``params``: (shared, per-task) parameters to use instead of the module's own."""
        shared, task = params or self.split()
        return vmap(self.sample_one, in_dims=(None, 0, 0, 0))(shared, task, obs, noise)

    def mode(self, obs: Tensor, params: SplitParams | None = None) -> Tensor:
        shared, task = params or self.split()
        return vmap(self.mode_one, in_dims=(None, 0, 0))(shared, task, obs)


class TwinCritic(nn.Module):
    """Two Q networks Q(obs, action) (the minimum is used against over-estimation)."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden_sizes: list[int], num_tasks: int, architecture: str, init: str
    ) -> None:
        super().__init__()
        mode = per_task_mode(architecture)
        self.q1 = MultiTaskMLP(obs_dim + action_dim, 1, hidden_sizes, num_tasks, mode, init)
        self.q2 = MultiTaskMLP(obs_dim + action_dim, 1, hidden_sizes, num_tasks, mode, init)

    def split(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        shared, task = {}, {}
        for prefix, net in (("q1", self.q1), ("q2", self.q2)):
            s, t = net.split()
            shared.update({f"{prefix}.{k}": v for k, v in s.items()})
            task.update({f"{prefix}.{k}": v for k, v in t.items()})
        return shared, task

    def forward_one(self, shared: Params, task: Params, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """One task: Q1, Q2 of shape [B]."""
        x = torch.cat([obs, action], dim=-1)
        q1 = self.q1.forward_one(sub_params(shared, "q1"), sub_params(task, "q1"), x)
        q2 = self.q2.forward_one(sub_params(shared, "q2"), sub_params(task, "q2"), x)
        return q1.squeeze(-1), q2.squeeze(-1)

    def forward(self, obs: Tensor, action: Tensor, params: SplitParams | None = None) -> tuple[Tensor, Tensor]:
        shared, task = params or self.split()
        return vmap(self.forward_one, in_dims=(None, 0, 0, 0))(shared, task, obs, action)
