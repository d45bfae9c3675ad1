import pytest
import torch


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
