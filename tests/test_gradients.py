"""Per-task gradients: the batched pass equals K separate backward passes."""

import torch
from torch import nn
from torch.func import functional_call

from rl_mtl.aggregators import make_aggregator
from rl_mtl.gradients import task_gradients, task_gradients_loop, write_gradients


def _setup(k=4, b=16, d=7, heads=True, seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    head_w = nn.Parameter(torch.randn(k, 1, 32) * 0.1)
    head_b = nn.Parameter(torch.zeros(k, 1))
    shared = dict(trunk.named_parameters())
    task = {"head.weight": head_w, "head.bias": head_b} if heads else {}
    batch = {"x": torch.randn(k, b, d), "y": torch.randn(k, b)}

    def task_loss(shared_p, task_p, task_batch):
        h = functional_call(trunk, shared_p, (task_batch["x"],))
        if task_p:
            out = h @ task_p["head.weight"].T + task_p["head.bias"]
        else:
            out = h.sum(-1, keepdim=True)
        return ((out.squeeze(-1) - task_batch["y"]) ** 2).mean()

    return trunk, shared, task, batch, task_loss


def test_batched_per_task_gradients_equal_separate_backward_passes():
    _, shared, task, batch, task_loss = _setup()
    fast = task_gradients(task_loss, shared, task, batch)
    slow = task_gradients_loop(task_loss, shared, task, batch)
    assert torch.allclose(fast.losses, slow.losses, atol=1e-6)
    assert torch.allclose(fast.matrix(), slow.matrix(), atol=1e-5, rtol=1e-5)
    for name in task:
        assert torch.allclose(fast.task_specific[name], slow.task_specific[name], atol=1e-5)
    assert torch.allclose(fast.gramian(), fast.matrix() @ fast.matrix().T, rtol=1e-5)


def test_per_task_gradients_on_sac_sized_network():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(53, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 1))
    batch = (torch.randn(10, 32, 53), torch.randn(10, 32))

    def task_loss(shared_p, task_p, task_batch):
        x, y = task_batch
        return ((functional_call(net, shared_p, (x,)).squeeze(-1) - y) ** 2).mean()

    shared = dict(net.named_parameters())
    fast = task_gradients(task_loss, shared, {}, batch)
    slow = task_gradients_loop(task_loss, shared, {}, batch)
    assert torch.allclose(fast.matrix(), slow.matrix(), atol=1e-5, rtol=1e-5)


def test_write_gradients_mean_weights_equal_mean_loss_backward():
    trunk, shared, task, batch, task_loss = _setup(heads=False)
    grads = task_gradients(task_loss, shared, task, batch)
    write_gradients(shared, task, grads, make_aggregator("ls")(grads.gramian()))
    combined = {n: p.grad.clone() for n, p in shared.items()}
    trunk.zero_grad()
    losses = torch.stack([task_loss(shared, {}, {k: v[i] for k, v in batch.items()}) for i in range(4)])
    losses.mean().backward()
    for name, p in shared.items():
        assert torch.allclose(combined[name], p.grad, atol=1e-6)


def test_task_specific_parameters_get_their_own_plain_gradient():
    _, shared, task, batch, task_loss = _setup()
    grads = task_gradients(task_loss, shared, task, batch)
    weights = torch.tensor([0.1, 2.0, 0.0, 5.0])
    write_gradients(shared, task, grads, weights)
    slow = task_gradients_loop(task_loss, shared, task, batch)
    assert torch.allclose(task["head.weight"].grad, slow.task_specific["head.weight"], atol=1e-6)
    expected = weights @ slow.matrix()
    got = torch.cat([p.grad.reshape(-1) for p in shared.values()])
    assert torch.allclose(got, expected, atol=1e-5)


def test_total_is_non_finite_when_any_gradient_is():
    _, shared, task, batch, task_loss = _setup()
    grads = task_gradients(task_loss, shared, task, batch)
    assert torch.isfinite(grads.total())
    grads.shared["0.weight"][1, 0, 0] = float("inf")  # a finite loss whose gradient overflowed
    assert torch.isfinite(grads.losses).all() and not torch.isfinite(grads.total())
