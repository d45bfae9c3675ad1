"""Building, seeding and stepping Meta-World vector environments.

One sub-environment per task, in the benchmark's task order. Autoreset is disabled: the trainer
resets finished sub-environments itself, so the observation a step returns at truncation is the
true final observation, and a checkpoint taken at an episode boundary (before the reset draws
the next goal) resumes exactly.

Seeding: numpy's global RNG, the benchmark (goal sampling) and every sub-environment get the
run seed, and the first reset passes it too, so one seed gives one sequence of goals.
"""

from __future__ import annotations

import base64
import pickle
import warnings
from functools import partial
from typing import Any

import numpy as np

from .config import EnvConfig


class EnvError(RuntimeError):
    """An environment problem (missing Meta-World, unknown task) with the fix in the message."""


def _metaworld():
    # Meta-World declares float64 boxes that gymnasium casts to float32, warning each time.
    warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")
    try:
        import gymnasium as gym
        import metaworld
        import metaworld.env_dict as env_dict
    except ImportError as err:
        raise EnvError(
            f"Meta-World is not importable ({err}); install the project with its pinned dependencies: "
            "pip install -c constraints.txt -e ."
        ) from err
    return gym, metaworld, env_dict


def task_names(cfg: EnvConfig) -> list[str]:
    """The tasks in sub-environment order."""
    _, _, env_dict = _metaworld()
    if cfg.benchmark == "MT10":
        return list(env_dict.MT10_V3)
    if cfg.benchmark == "MT50":
        return list(env_dict.MT50_V3)
    known = env_dict.ALL_V3_ENVIRONMENTS
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise EnvError(f"unknown Meta-World task(s) {', '.join(unknown)}; valid names: {', '.join(sorted(known))}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise EnvError(f"env.tasks lists a task twice: {cfg.tasks}")
    return list(cfg.tasks)


def make_vector_env(cfg: EnvConfig, seed: int, evaluation: bool = False) -> Any:
    """The vector env for training, or for evaluation (``evaluation=True``).

    Evaluation with ``goal_mode=random`` cycles through the 50 stored goals of each task
    ("pseudorandom" task selection: each reset moves to the next goal, no repeats within 50).
    With ``goal_mode=fixed`` evaluation is built exactly like training, so its first reset
    draws the same single goal per task that training uses.
    """
    gym, _, _ = _metaworld()
    names = task_names(cfg)
    cycle_goals = evaluation and cfg.goal_mode == "random"
    common = {
        "seed": seed,
        "use_one_hot": cfg.one_hot,
        "max_episode_steps": cfg.max_episode_steps,
        "reward_function_version": cfg.reward_version,
        "terminate_on_success": False,
        "task_select": "pseudorandom" if cycle_goals else "random",
    }
    autoreset = gym.vector.AutoresetMode.DISABLED
    np.random.seed(seed)  # goal sampling also reads numpy's global RNG
    if cfg.benchmark in ("MT10", "MT50"):
        env = gym.make_vec(
            f"Meta-World/{cfg.benchmark}", vector_strategy=cfg.vector_strategy, autoreset_mode=autoreset, **common
        )
    else:
        from metaworld import make_mt_envs

        fns = [partial(make_mt_envs, name, num_tasks=len(names), env_id=i, **common) for i, name in enumerate(names)]
        vector_cls = gym.vector.AsyncVectorEnv if cfg.vector_strategy == "async" else gym.vector.SyncVectorEnv
        env = vector_cls(fns, autoreset_mode=autoreset)
    if cycle_goals:
        # Every reset moves to the next stored goal; the first one happens in run_evaluation,
        # so N <= 50 evaluation episodes see N distinct goals.
        env.call("toggle_sample_tasks_on_reset", True)
        return env
    env.reset(seed=seed)  # the first goal of every task is drawn here
    if cfg.goal_mode == "fixed":
        env.call("toggle_sample_tasks_on_reset", False)  # keep that goal for the whole run
    return env


def env_checkpoint(env: Any) -> list[dict[str, Any]]:
    """A vector env's Meta-World checkpoint (every sub-env's goal list, current goal and RNG
    states) as plain data. Meta-World stores each goal as a pickle, and unpickles what its
    ``load_checkpoint`` is given: a checkpoint file must never hold one, since reading the file
    would then run whatever it says. So the goals are kept as their numbers (``rand_vec``) and
    options, and the pickles are rebuilt from those on load (``load_env_checkpoint``)."""
    saved = []
    for env_id, checkpoint in env.call("get_checkpoint"):
        tasks = []
        for task in checkpoint["tasks"]:
            data = pickle.loads(base64.b64decode(task["data"]))  # made by Meta-World in this process
            data.pop("env_cls")
            tasks.append({"env_name": task["env_name"], **data})
            if set(tasks[-1]) != TASK_FIELDS:
                fields = sorted(tasks[-1])
                raise EnvError(f"Meta-World's goal of {task['env_name']} has fields {fields}; this rl-mtl saves only "
                               f"{sorted(TASK_FIELDS)}")  # fmt: skip
        saved.append({**checkpoint, "env_id": env_id, "tasks": tasks})
    return saved


TASK_FIELDS = {"env_name", "rand_vec", "partially_observable"}  # what a Meta-World goal holds (besides its class)


def load_env_checkpoint(env: Any, saved: list[dict[str, Any]]) -> None:
    """Restore an ``env_checkpoint``: the goals' pickles are built here from the saved numbers,
    each with the environment class its task name maps to."""
    _, _, env_dict = _metaworld()
    checkpoints = []
    for checkpoint in saved:
        tasks = []
        for task in checkpoint["tasks"]:
            name = task.get("env_name")
            if name not in env_dict.ALL_V3_ENVIRONMENTS:
                raise EnvError(f"the saved environment state names an unknown Meta-World task {name!r}")
            if set(task) != TASK_FIELDS or not isinstance(task["partially_observable"], bool):
                raise EnvError(f"the saved goal of {name} has fields {sorted(task)}; expected {sorted(TASK_FIELDS)}")
            data = {
                "rand_vec": np.asarray(task["rand_vec"], dtype=np.float64),
                "partially_observable": task["partially_observable"],
                "env_cls": env_dict.ALL_V3_ENVIRONMENTS[name],
            }
            tasks.append({"env_name": name, "data": base64.b64encode(pickle.dumps(data)).decode("ascii")})
        fields = {k: v for k, v in checkpoint.items() if k != "env_id"}
        checkpoints.append((checkpoint["env_id"], {**fields, "tasks": tasks}))
    try:
        env.call("load_checkpoint", checkpoints)
    except (AssertionError, KeyError, TypeError, ValueError) as err:
        raise EnvError(f"the saved environment state does not fit this run's environments ({err})") from err


class RewardNormalizer:
    """Divides each task's reward by a running standard deviation (EMA, no mean subtraction from
    the reward itself), as the paper harness did; one per seed and task ([S, K]). Its state is
    checkpointed per seed."""

    def __init__(self, num_seeds: int, num_tasks: int, rate: float) -> None:
        self.rate = rate
        self.mean = np.zeros((num_seeds, num_tasks))
        self.var = np.ones((num_seeds, num_tasks))

    def __call__(self, reward: np.ndarray) -> np.ndarray:
        self.mean = (1 - self.rate) * self.mean + self.rate * reward
        self.var = (1 - self.rate) * self.var + self.rate * np.square(reward - self.mean)
        return reward / (np.sqrt(self.var) + 1e-8)

    def seed_state(self, s: int) -> dict[str, Any]:
        return {"mean": self.mean[s].copy(), "var": self.var[s].copy()}

    def load_seed_state(self, s: int, state: dict[str, Any]) -> None:
        self.mean[s], self.var[s] = np.asarray(state["mean"]), np.asarray(state["var"])


class VectorEnvRunner:
    """Steps a vector env and keeps per-task episode statistics.

    Returns, per step, what the replay buffer needs: the true next observation (also at
    truncation), rewards, and ``terminated`` (never true in Meta-World unless configured);
    finished episodes are reported and reset by ``reset_finished``.
    """

    def __init__(self, env: Any, num_tasks: int) -> None:
        self.env = env
        self.num_tasks = num_tasks
        self.obs: np.ndarray | None = None
        self.episode_return = np.zeros(num_tasks)
        self.episode_success = np.zeros(num_tasks)
        self.episode_length = np.zeros(num_tasks, dtype=np.int64)
        self._pending: Any = None  # a sync env's result between step_async and step_wait

    def reset_all(self) -> np.ndarray:
        self.obs, _ = self.env.reset()
        self.episode_return[:] = 0
        self.episode_success[:] = 0
        self.episode_length[:] = 0
        return self.obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.step_async(action)
        return self.step_wait()

    @property
    def can_overlap(self) -> bool:
        """True for an async vector env: its sub-processes step while this process works."""
        return hasattr(self.env, "step_async")

    def step_async(self, action: np.ndarray) -> None:
        """Start a step (an async env steps in its sub-processes; a sync env steps right here)."""
        if self.can_overlap:
            self.env.step_async(action)
            self._pending = None
        else:
            self._pending = self.env.step(action)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Finish the step started by ``step_async``: (next_obs, reward, terminated, truncated)."""
        result = self.env.step_wait() if self._pending is None else self._pending
        self._pending = None
        next_obs, reward, terminated, truncated, info = result
        self.episode_return += reward
        self.episode_success = np.maximum(self.episode_success, np.asarray(info["success"], dtype=np.float64))
        self.episode_length += 1
        self.obs = next_obs
        return next_obs, np.asarray(reward, dtype=np.float64), np.asarray(terminated), np.asarray(truncated)

    def finished_stats(self, done: np.ndarray) -> dict[str, np.ndarray]:
        """Episode statistics of the finished sub-envs (arrays over the finished tasks)."""
        return {
            "task": np.flatnonzero(done),
            "return": self.episode_return[done].copy(),
            "success": self.episode_success[done].copy(),
            "length": self.episode_length[done].copy(),
        }

    def reset_finished(self, done: np.ndarray) -> None:
        """Reset the finished sub-envs (drawing their next goals); the others keep going."""
        if not done.any():
            return
        obs, _ = self.env.reset(options={"reset_mask": done})
        self.obs = np.where(done[:, None], obs, self.obs)
        self.episode_return[done] = 0
        self.episode_success[done] = 0
        self.episode_length[done] = 0


# How a dead async worker (killed, crashed, out of memory) shows in its pipe
WORKER_DIED = (EOFError, BrokenPipeError, ConnectionResetError)


def worker_died(err: Exception) -> EnvError:
    return EnvError(
        f"an environment worker process died ({type(err).__name__}: {err}); nothing was saved since the last "
        "checkpoint: resume the run from it with --resume"
    )


class PopulationEnvs:
    """The training envs of a population: one vector env per seed (one sub-env per task, seeded
    as that seed alone), stepped together. Every seed's env is sent its actions before any is
    waited on, so async envs step in parallel (and while the update runs)."""

    def __init__(self, envs: list[Any], num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.runners = [VectorEnvRunner(env, num_tasks) for env in envs]

    def add(self, env: Any) -> None:
        """One more seed's vector env."""
        self.runners.append(VectorEnvRunner(env, self.num_tasks))

    @property
    def obs(self) -> np.ndarray:
        """[S, K, obs_dim]: every seed's current observations."""
        return np.stack([runner.obs for runner in self.runners])

    @property
    def can_overlap(self) -> bool:
        return self.runners[0].can_overlap

    def reset_all(self) -> np.ndarray:
        return np.stack([runner.reset_all() for runner in self.runners])

    def step_async(self, action: np.ndarray) -> None:
        """Start every seed's step: action [S, K, A]."""
        try:
            for runner, seed_action in zip(self.runners, action, strict=True):
                runner.step_async(seed_action)
        except WORKER_DIED as err:
            raise worker_died(err) from err

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(next_obs [S, K, obs_dim], reward [S, K], terminated [S, K], truncated [S, K])."""
        try:
            steps = [runner.step_wait() for runner in self.runners]
        except WORKER_DIED as err:
            raise worker_died(err) from err
        return tuple(np.stack(field) for field in zip(*steps, strict=True))  # type: ignore[return-value]

    def reset_finished(self, done: np.ndarray) -> np.ndarray:
        """Reset every seed's finished sub-envs (done [S, K]); returns the observations [S, K, obs_dim]."""
        try:
            for runner, seed_done in zip(self.runners, done, strict=True):
                runner.reset_finished(seed_done)
        except WORKER_DIED as err:
            raise worker_died(err) from err
        return self.obs

    def close(self) -> None:
        for runner in self.runners:
            close_env(runner.env)


def close_env(env: Any) -> None:
    """Close a vector env, also an async one a worker of which died in the middle of a step
    (gymnasium's close would wait for that step: the other workers are ended here instead)."""
    try:
        env.close()
    except (*WORKER_DIED, OSError):
        for process in env.processes:
            if process.is_alive():
                process.terminate()
        for pipe in env.parent_pipes:
            pipe.close()
        for process in env.processes:
            process.join()
        env.closed = True


def run_evaluations(envs: list[Any], policy: Any, episodes: int, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``episodes`` episodes on every task of every env (one per seed) in lockstep, with
    ``policy`` mapping obs [S, K, obs_dim] to actions [S, K, A]; every env is sent its actions
    before any is waited on, so async envs step in parallel. Returns each seed's per-task success
    rate and mean return, arrays [S, K]. An episode succeeds if the success flag was 1 at any
    step (PROTOCOL.md); every reset of an evaluation env moves to the next goal."""
    runners = PopulationEnvs(envs, envs[0].num_envs)
    successes = np.zeros((len(envs), envs[0].num_envs))
    returns = np.zeros_like(successes)
    for _ in range(episodes):
        obs = runners.reset_all()
        for _ in range(max_steps):
            runners.step_async(policy(obs))
            obs, _, terminated, truncated = runners.step_wait()
            if np.all(terminated | truncated):
                break
        successes += np.stack([runner.episode_success for runner in runners.runners])
        returns += np.stack([runner.episode_return for runner in runners.runners])
    return successes / episodes, returns / episodes
