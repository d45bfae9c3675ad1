import pytest
import torch

from rl_mtl.aggregators import make_aggregator

# Options a method cannot do without (AuxiNash's main task), for tests that run every method.
REQUIRED = {"auxinash": {"main_task": "task0"}}


def aggregator(method: str, **options):
    """``make_aggregator`` with what the method requires (its main task: the first task)."""
    return make_aggregator(method, **{**REQUIRED.get(method, {}), **options})


def random_gramian(k: int, seed: int, dims: int | None = None, spread: float = 1.0) -> torch.Tensor:
    """G G^T for random Gaussian task gradients (positive definite when dims >= k).

    ``spread`` > 1 spreads the task-gradient norms log-uniformly over [1/spread, spread].
    """
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, dims or 2 * k, dtype=torch.float64, generator=g)
    grads = grads * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None] ** (torch.log10(torch.tensor(spread)))
    return grads @ grads.T


@pytest.fixture
def gramian_factory():
    return random_gramian


HOST_READS = {
    "item",
    "__bool__",
    "tolist",
    "numpy",
    "cpu",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "masked_select",
}


class NoHostReads(torch.overrides.TorchFunctionMode):
    """Fail on any tensor operation that reads device data back to the host (on a GPU, a stall
    of the stream). Run on the CPU, it checks the code path the GPU takes; it sees Python-level
    reads only, so the CUDA tests also run with ``torch.cuda.set_sync_debug_mode("error")``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in _index_parts(args[1:])
        )
        if name in HOST_READS or boolean_index:
            raise AssertionError(f"host read on the device path: Tensor.{name}")
        return func(*args, **(kwargs or {}))


def _index_parts(args):
    for index in args:
        yield from index if isinstance(index, tuple) else (index,)
