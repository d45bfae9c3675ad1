"""rl-mtl: multi-task SAC on Meta-World with gradient aggregation (Nash-MTL, FairGrad, ...)."""

__version__ = "0.1.0"
