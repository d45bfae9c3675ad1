"""The per-task replay buffer."""

import torch

from rl_mtl.buffers import MultiTaskReplayBuffer


def _fill(buf, n, k=3, obs_dim=2):
    for i in range(n):
        obs = torch.full((k, obs_dim), float(i)) + torch.arange(k)[:, None] * 1000
        buf.add(obs, torch.zeros(k, 1), torch.full((k,), float(i)), obs + 0.5, torch.zeros(k))


def test_samples_come_from_the_right_task_and_keep_transitions_together():
    buf = MultiTaskReplayBuffer(3, 10, 2, 1, torch.device("cpu"), seed=0)
    _fill(buf, 7)
    batch = buf.sample(64)
    assert batch.obs.shape == (3, 64, 2) and batch.reward.shape == (3, 64)
    for task in range(3):
        step = batch.reward[task]
        assert torch.all(step < 7)
        assert torch.equal(batch.obs[task, :, 0], step + 1000 * task)  # task k's rows only
        assert torch.equal(batch.next_obs[task, :, 0], step + 1000 * task + 0.5)


def test_ring_buffer_overwrites_oldest():
    buf = MultiTaskReplayBuffer(2, 5, 2, 1, torch.device("cpu"))
    _fill(buf, 12, k=2)
    assert len(buf) == 5
    assert set(buf.reward[0].tolist()) == {7.0, 8.0, 9.0, 10.0, 11.0}


def test_state_round_trip_continues_identically():
    a = MultiTaskReplayBuffer(3, 10, 2, 1, torch.device("cpu"), seed=5)
    _fill(a, 6)
    b = MultiTaskReplayBuffer(3, 10, 2, 1, torch.device("cpu"), seed=99)
    b.load_state_dict(a.state_dict())
    _fill(a, 2)
    _fill(b, 2)
    for x, y in zip(vars(a.sample(8)).values(), vars(b.sample(8)).values(), strict=True):
        assert torch.equal(x, y)
