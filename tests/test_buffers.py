"""The population's replay: [S, K, C] ring buffers, each seed sampling with its own generator."""

import torch

from rl_mtl.buffers import FIELDS, ReplayBuffer

CPU = torch.device("cpu")


def _fill(buf, n, seeds=1, k=3, obs_dim=2, start=0):
    for i in range(start, start + n):
        obs = torch.full((seeds, k, obs_dim), float(i)) + torch.arange(k)[:, None] * 1000
        obs = obs + torch.arange(seeds)[:, None, None] * 100_000
        buf.add(obs, torch.zeros(seeds, k, 1), torch.full((seeds, k), float(i)), obs + 0.5, torch.zeros(seeds, k))


def test_samples_come_from_the_right_seed_and_task_and_keep_transitions_together():
    buf = ReplayBuffer([0, 1], 3, 10, 2, 1, CPU)
    _fill(buf, 7, seeds=2)
    batch = buf.sample(64)
    assert batch.obs.shape == (2, 3, 64, 2) and batch.reward.shape == (2, 3, 64)
    for seed in range(2):
        for task in range(3):
            step = batch.reward[seed, task]
            assert torch.all(step < 7)
            assert torch.equal(batch.obs[seed, task, :, 0], step + 1000 * task + 100_000 * seed)
            assert torch.equal(batch.next_obs[seed, task, :, 0], step + 1000 * task + 100_000 * seed + 0.5)


def test_ring_buffer_overwrites_oldest():
    buf = ReplayBuffer([0], 2, 5, 2, 1, CPU)
    _fill(buf, 12, k=2)
    assert len(buf) == 5
    assert set(buf.storage["reward"][0, 0].tolist()) == {7.0, 8.0, 9.0, 10.0, 11.0}


def test_each_seed_samples_as_it_would_alone_and_its_state_round_trips():
    together = ReplayBuffer([5, 9], 3, 10, 2, 1, CPU)
    alone = [ReplayBuffer([seed], 3, 10, 2, 1, CPU) for seed in (5, 9)]
    g = torch.Generator().manual_seed(0)
    for _ in range(13):  # wraps around the ring
        t = [torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 1, generator=g), torch.randn(2, 3, generator=g),
             torch.randn(2, 3, 2, generator=g), torch.zeros(2, 3)]  # fmt: skip
        together.add(*t)
        for s, buf in enumerate(alone):
            buf.add(*(x[s : s + 1] for x in t))
    batch = together.sample(8)
    for s, buf in enumerate(alone):
        expected = buf.sample(8)
        for name in FIELDS:
            assert torch.equal(getattr(batch, name)[s], getattr(expected, name)[0]), name
    # a seed's checkpoint is that of a buffer of its own, and resumes it alone or in a population
    resumed = ReplayBuffer([0], 3, 10, 2, 1, CPU)
    resumed.load_seed_state(0, together.seed_state(1))
    for x, y in zip(vars(resumed.sample(8)).values(), vars(alone[1].sample(8)).values(), strict=True):
        assert torch.equal(x[0], y[0])
