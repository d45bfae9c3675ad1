"""The update's GPU path reads nothing back to the host: no convergence tests, no finiteness
checks, no boolean masks. Checked on the CPU by running that path (``sync_free()``) under a
guard that fails on host reads, and on CUDA with the driver's own sync detector."""

import pytest
import torch
from conftest import REQUIRED, NoHostReads, aggregator, random_gramian

from rl_mtl.agents import SAC, Population
from rl_mtl.aggregators import AGGREGATORS
from rl_mtl.aggregators.solvers import may_read_back, sync_free
from rl_mtl.buffers import Batch
from rl_mtl.config import load_config

K, B, OBS, ACT = 4, 16, 7, 3
TASKS = [f"task{k}" for k in range(K)]
CASES = [(method, "shared") for method in sorted(AGGREGATORS)] + [("nashmtl", "multihead"), ("ls", "independent")]


def _population(method, architecture, seeds, device):
    agent = load_config("smoke", [f"agent.architecture={architecture}"]).agent
    return Population(SAC(OBS, ACT, TASKS, agent, method, REQUIRED.get(method)), seeds, device)


def _batch(seeds, device, nan_reward=False):
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(seeds, *shape, generator=g)

    reward = rand(K, B)
    if nan_reward:
        reward[:, 0] = float("nan")  # every seed's first task's rewards
    terminated = (torch.rand(seeds, K, B, generator=g) < 0.1).float()
    fields = (rand(K, B, OBS), rand(K, B, ACT).clamp(-1, 1), reward, rand(K, B, OBS), terminated)
    return Batch(*(t.to(device) for t in fields))


@pytest.mark.parametrize(("method", "architecture"), CASES)
@pytest.mark.parametrize("seeds", [[0], [0, 1]], ids=["one seed", "two seeds"])
def test_an_update_on_the_gpu_path_reads_nothing_back(method, architecture, seeds):
    cpu = torch.device("cpu")
    population = _population(method, architecture, seeds, cpu)
    with sync_free(), NoHostReads():
        assert not may_read_back(torch.zeros(1))
        for nan_reward in (False, True, False):  # applied, skipped on the device, applied again
            metrics = population.update(_batch(len(seeds), cpu, nan_reward), diagnostics=True)
    # (outside the guard) the skip really happened on the device, and only there
    assert [c[0] for c in population.skip_counts()] == [1] * len(seeds)
    assert bool(metrics["applied"].all())


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_solving_without_read_backs_gives_the_converged_weights(method):
    """The GPU path runs the solvers' whole iteration budget instead of stopping once converged
    (the CPU's early stop): both must reach the same weights, without fallbacks."""
    for k in (2, 5, 10, 20, 50):
        m = random_gramian(k, 200 + k, spread=10.0)
        early, full = aggregator(method), aggregator(method)  # same seeded random numbers
        expected = early(m)
        with sync_free():
            got = full(m)
        # CAGrad's dual is flat near its optimum: its weights agree to ~1e-7, the others' to ~1e-12
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
        assert early.fallbacks == full.fallbacks == 0, f"{method}, K={k}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# IMTL-G's torch.linalg.eigh checks its result on the host on CUDA (no _ex variant exists)
@pytest.mark.parametrize(("method", "architecture"), [c for c in CASES if c[0] != "imtlg"])
def test_an_update_on_cuda_does_not_synchronise(method, architecture):
    cuda = torch.device("cuda")
    population = _population(method, architecture, [0, 1], cuda)
    batches = [_batch(2, cuda, nan) for nan in (False, True)]
    population.update(batches[0])  # first-call work (allocations) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            population.update(batch, diagnostics=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [c[0] for c in population.skip_counts()] == [1, 1]
