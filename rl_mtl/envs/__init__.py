"""Meta-World 3.x vector environments for multi-task RL (one sub-environment per task)."""

from .metaworld_envs import (
    EnvError,
    PopulationEnvs,
    RewardNormalizer,
    VectorEnvRunner,
    close_env,
    env_checkpoint,
    load_env_checkpoint,
    make_vector_env,
    run_evaluations,
    task_names,
)

__all__ = [
    "EnvError",
    "PopulationEnvs",
    "RewardNormalizer",
    "VectorEnvRunner",
    "close_env",
    "env_checkpoint",
    "load_env_checkpoint",
    "make_vector_env",
    "run_evaluations",
    "task_names",
]
