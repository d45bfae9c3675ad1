"""Multi-task SAC: networks, the population update, its optimiser and its metric sums."""

from .networks import Network
from .population import Population, to_host
from .sac import SAC, NonFiniteLossError
from .sums import MetricSums

__all__ = ["SAC", "MetricSums", "Network", "NonFiniteLossError", "Population", "to_host"]
