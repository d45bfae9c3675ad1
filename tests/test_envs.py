"""Meta-World vector envs: seeding, goals, truncation, success."""

import numpy as np
import pytest

from rl_mtl.config import EnvConfig
from rl_mtl.envs import EnvError, VectorEnvRunner, make_vector_env, run_evaluations, task_names

MT3 = ["reach-v3", "drawer-close-v3", "window-close-v3"]


def _goals(env):
    """Each task's current goal vector, concatenated (their lengths differ between tasks)."""
    return np.concatenate([e.unwrapped._last_rand_vec for e in env.envs])


def _task_goal(env, task):
    return tuple(np.round(env.envs[task].unwrapped._last_rand_vec, 8))


def _cfg(**kw):
    return EnvConfig(**{"benchmark": "custom", "tasks": MT3, "max_episode_steps": 20, **kw})


def test_one_seed_gives_one_sequence_of_goals():
    runs = []
    for seed in (3, 3, 4):
        env = make_vector_env(_cfg(), seed)
        runner = VectorEnvRunner(env, 3)
        goals = [_goals(env)]
        for _ in range(2):
            runner.reset_finished(np.ones(3, dtype=bool))
            goals.append(_goals(env))
        runs.append(np.stack(goals))
        env.close()
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert not np.array_equal(runs[0][0], runs[0][1]), "goal_mode=random draws a new goal per reset"


def test_mt10_is_built_with_make_vec_in_task_order_with_one_hot():
    cfg = EnvConfig(max_episode_steps=10)
    env = make_vector_env(cfg, 0)
    assert env.num_envs == 10 and env.single_observation_space.shape == (49,)
    assert env.envs[0].unwrapped.__class__.__name__ == "SawyerReachEnvV3"
    obs, _ = env.reset()
    assert np.array_equal(obs[:, 39:], np.eye(10)), "task one-hot appended in task order"
    assert task_names(cfg)[:2] == ["reach-v3", "push-v3"]
    env.close()


def test_evaluation_env_visits_distinct_goals():
    env = make_vector_env(_cfg(), 0, evaluation=True)
    seen = {task: set() for task in range(3)}
    for _ in range(5):
        env.reset()
        for task in range(3):
            seen[task].add(_task_goal(env, task))
    assert all(len(goals) == 5 for goals in seen.values())
    env.close()


def test_fixed_goal_mode_reuses_the_training_goal_for_evaluation():
    cfg = _cfg(goal_mode="fixed")
    train_env, eval_env = make_vector_env(cfg, 7), make_vector_env(cfg, 7, evaluation=True)
    first = _goals(train_env)
    VectorEnvRunner(train_env, 3).reset_finished(np.ones(3, dtype=bool))
    eval_env.reset()
    assert np.array_equal(_goals(train_env), first) and np.array_equal(_goals(eval_env), first)
    train_env.close()
    eval_env.close()


def test_truncation_returns_the_true_final_observation():
    env = make_vector_env(_cfg(max_episode_steps=5), 0)
    runner = VectorEnvRunner(env, 3)
    runner.reset_all()
    for i in range(5):
        next_obs, _, terminated, truncated = runner.step(np.zeros((3, 4)))
        assert not terminated.any() and truncated.all() == (i == 4)
    final = next_obs.copy()
    runner.reset_finished(truncated)
    assert not np.allclose(runner.obs[:, :18], final[:, :18]), "after the reset the observation starts anew"
    assert np.allclose(final, next_obs), "the stored next observation is the last one of the episode"
    env.close()


class _FakeVectorEnv:
    """Two tasks; task 0 succeeds only at step 2 of 4, task 1 never."""

    num_envs = 2

    def reset(self, **_):
        self.t = 0
        return np.zeros((2, 3)), {}

    def step(self, action):
        self.t += 1
        success = np.array([1.0 if self.t == 2 else 0.0, 0.0])
        done = np.full(2, self.t == 4)
        return np.zeros((2, 3)), np.ones(2), np.zeros(2, dtype=bool), done, {"success": success}


def test_success_means_success_at_any_step():
    envs = [_FakeVectorEnv(), _FakeVectorEnv()]  # two seeds' eval envs, stepped in lockstep
    success, returns = run_evaluations(envs, lambda obs: np.zeros((*obs.shape[:2], 4)), episodes=3, max_steps=4)
    assert success.tolist() == [[1.0, 0.0]] * 2 and returns.tolist() == [[4.0, 4.0]] * 2


def test_unknown_task_names_are_listed():
    with pytest.raises(EnvError, match=r"unknown Meta-World task.*reach-v9.*valid names"):
        task_names(EnvConfig(benchmark="custom", tasks=["reach-v9"]))
