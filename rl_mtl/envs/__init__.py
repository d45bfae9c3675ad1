"""Meta-World 3.x vector environments for multi-task RL (one sub-environment per task)."""

from .metaworld_envs import (
    EnvError,
    RewardNormalizer,
    VectorEnvRunner,
    make_vector_env,
    run_evaluation,
    run_evaluations,
    task_names,
)

__all__ = [
    "EnvError",
    "RewardNormalizer",
    "VectorEnvRunner",
    "make_vector_env",
    "run_evaluation",
    "run_evaluations",
    "task_names",
]
