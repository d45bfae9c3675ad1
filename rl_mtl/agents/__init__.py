"""Multi-task SAC: networks (shared, multi-head, independent) and the per-task-loss update."""

from .networks import Actor, MultiTaskMLP, TwinCritic
from .sac import MultiTaskSAC, NonFiniteLossError

__all__ = ["Actor", "MultiTaskMLP", "MultiTaskSAC", "NonFiniteLossError", "TwinCritic"]
