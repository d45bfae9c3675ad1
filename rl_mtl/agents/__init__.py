"""Multi-task SAC: networks (the architecture registry), the population update, its optimiser."""

from .networks import ARCHITECTURES, Network
from .population import COMPILE_MODES, Population, to_host
from .sac import SAC, NonFiniteLossError

__all__ = ["ARCHITECTURES", "COMPILE_MODES", "SAC", "Network", "NonFiniteLossError", "Population", "to_host"]
