"""The SAC maths against independent formulations: torch.distributions for the squashed Gaussian,
plain nn modules for the TD target, autograd for the temperature, torch.optim.Adam for the
population's optimiser step."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from rl_mtl.agents.networks import MLP, IndependentMLPs, MultiHeadMLP
from rl_mtl.agents.optim import adam_init, adam_step
from rl_mtl.agents.sac import TanhGaussianPolicy, TwinCritic, soft_td_target, temperature_gradient

K, B, OBS, ACT = 3, 5, 6, 2


@pytest.fixture(autouse=True)
def _float64():
    """Float64 throughout, so that agreement is checked to 1e-8 and not float32's rounding."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _mlp_module(shared, task, k, layers):
    """Task k's network as plain nn.Linear layers with the given parameters."""
    mods = []
    for layer in range(layers):
        src = task if f"weight{layer}" in task else shared
        weight = src[f"weight{layer}"][k] if f"weight{layer}" in task else src[f"weight{layer}"]
        bias = src[f"bias{layer}"][k] if f"bias{layer}" in task else src[f"bias{layer}"]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data, linear.bias.data = weight.clone(), bias.clone()
        mods += [linear, nn.ReLU()]
    return nn.Sequential(*mods[:-1])


TASKS = ["a", "b", "c"]


def _policy(network=MultiHeadMLP):
    net = network(OBS, 0, 2 * ACT, TASKS, [8, 8], "default")
    policy = TanhGaussianPolicy(net, -5.0, 2.0)
    return policy, policy.init(torch.Generator().manual_seed(0))


def test_the_squashed_gaussian_log_probability_is_torch_distributions():
    policy, params = _policy()
    g = torch.Generator().manual_seed(1)
    obs, noise = torch.randn(K, B, OBS, generator=g), torch.randn(K, B, ACT, generator=g)
    action, log_prob = policy.sample(params, obs, noise)
    for k in range(K):
        out = _mlp_module(params["shared"], params["task"], k, 3)(obs[k])
        mean, log_std = out.chunk(2, dim=-1)
        dist = TransformedDistribution(Normal(mean, log_std.clamp(-5.0, 2.0).exp()), [TanhTransform(cache_size=1)])
        expected_action = torch.tanh(mean + log_std.clamp(-5.0, 2.0).exp() * noise[k])
        torch.testing.assert_close(action[k], expected_action)
        torch.testing.assert_close(log_prob[k], dist.log_prob(expected_action).sum(-1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(policy.mode(params, obs), torch.tanh(torch.stack(
        [_mlp_module(params["shared"], params["task"], k, 3)(obs[k]).chunk(2, -1)[0] for k in range(K)])))  # fmt: skip


def test_the_td_target_is_the_soft_bellman_backup():
    policy, actor_params = _policy(MLP)
    critic = TwinCritic(*(IndependentMLPs(OBS, ACT, 1, TASKS, [8, 8], "default") for _ in range(2)))
    target = critic.init(torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    next_obs, noise = torch.randn(K, B, OBS, generator=g), torch.randn(K, B, ACT, generator=g)
    reward, terminated = torch.randn(K, B, generator=g), (torch.rand(K, B, generator=g) < 0.3).double()
    alpha, gamma = torch.tensor([0.1, 0.5, 2.0]), 0.97
    got = soft_td_target(policy, critic, gamma, actor_params, target, next_obs, reward, terminated, noise, alpha)
    for k in range(K):
        out = _mlp_module(actor_params["shared"], actor_params["task"], k, 3)(next_obs[k])
        mean, log_std = out.chunk(2, dim=-1)
        std = log_std.clamp(-5.0, 2.0).exp()
        action = torch.tanh(mean + std * noise[k])
        log_prob = TransformedDistribution(Normal(mean, std), [TanhTransform()]).log_prob(action).sum(-1)
        q = [
            _mlp_module({}, {n[3:]: p for n, p in target["task"].items() if n.startswith(name)}, k, 3)(
                torch.cat([next_obs[k], action], -1)
            ).squeeze(-1)
            for name in ("q1.", "q2.")
        ]
        value = torch.min(q[0], q[1]) - alpha[k] * log_prob
        torch.testing.assert_close(got[k], reward[k] + gamma * (1 - terminated[k]) * value, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("shared", [False, True], ids=["per task", "shared"])
def test_the_temperature_gradient_is_autograd_of_the_temperature_loss(shared):
    g = torch.Generator().manual_seed(4)
    mean_log_prob, target_entropy = torch.randn(K, generator=g), -float(ACT)
    log_alpha = torch.randn(1 if shared else K, generator=g, requires_grad=True)
    gap = mean_log_prob + target_entropy
    # SAC's temperature loss: -log_alpha (log pi + target entropy), each task's own temperature
    # on its own samples, or one temperature on all tasks' samples (the mean over tasks)
    loss = -(log_alpha * gap.mean()).sum() if shared else -(log_alpha * gap).sum()
    (expected,) = torch.autograd.grad(loss, log_alpha)
    torch.testing.assert_close(temperature_gradient(mean_log_prob, target_entropy, shared), expected)
    two_seeds = temperature_gradient(torch.stack([mean_log_prob, mean_log_prob]), target_entropy, shared)
    torch.testing.assert_close(two_seeds, torch.stack([expected, expected]))


def test_the_population_adam_is_torch_adam_and_skips_per_seed():
    torch.manual_seed(5)
    params = {"w": torch.randn(2, 4, 3), "b": torch.randn(2, 4)}
    reference = [nn.Parameter(params[name][s].clone()) for s in range(2) for name in ("w", "b")]
    optimisers = [torch.optim.Adam(reference[2 * s : 2 * s + 2], lr=1e-3) for s in range(2)]
    state = adam_init(params)
    state["step"] = torch.zeros(2)
    for it in range(6):
        grads = {"w": torch.randn(2, 4, 3), "b": torch.randn(2, 4)}
        ok = torch.tensor([True, it not in (2, 3)])  # seed 1 skips two steps (its gradient not finite)
        if not ok[1]:
            grads["w"][1, 0, 0] = float("nan") if it == 2 else float("inf")
        adam_step(params, grads, state, ok, lr=1e-3)
        for s in range(2):
            if ok[s]:
                reference[2 * s].grad, reference[2 * s + 1].grad = grads["w"][s], grads["b"][s]
                optimisers[s].step()
    for s in range(2):
        torch.testing.assert_close(params["w"][s], reference[2 * s].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(params["b"][s], reference[2 * s + 1].detach(), rtol=0, atol=1e-12)
        torch_state = optimisers[s].state[reference[2 * s]]
        torch.testing.assert_close(state["exp_avg"]["w"][s], torch_state["exp_avg"], rtol=0, atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq"]["w"][s], torch_state["exp_avg_sq"], rtol=0, atol=1e-12)
        assert float(state["step"][s]) == float(torch_state["step"]) == (6 if s == 0 else 4)
    assert math.isfinite(float(params["w"].sum()))
