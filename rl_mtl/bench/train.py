"""``python -m rl_mtl.bench train``: end-to-end training throughput on the real vector envs.

Measures in ONE run, side by side: env-only throughput (random actions, the same vector envs),
the update time of each method and the kernels it dispatches, and full training throughput
(act + step + store + update) per method, then the ratios method update / ls update, kernels /
ls kernels and training / env-only throughput. With ``--seeds N`` every number is for N seeds
trained together (a population, one vector env per seed): a step is then one vector step of
every seed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..aggregators.solvers import sync_free
from ..config import COMPILE_MODES, ConfigError, load_config
from ..envs import VectorEnvRunner, make_vector_env, task_names
from ..registry import ARCHITECTURES, METHODS
from ..train import train_loop
from ..training import Training
from .aggregators import solving_methods
from .timing import count_executed, profile_compiled_kernels, sync

PROTOCOL_STEPS, PROTOCOL_SEEDS = 2_000_000, 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="mt10", help="config file or preset (default: mt10, the real networks)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=solving_methods(),
                        help="the methods to time (default: every one with a solve of its own; auxinash "
                             "needs --set method_options.auxinash.main_task=TASK)")  # fmt: skip
    parser.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES),
                        help="time every method on each of these architectures (default: the config's)")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=200, help="vector steps per timed block (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed blocks per method (median)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds trained together per method, as with train --seeds (default 1)"
    )
    parser.add_argument("--compile", nargs="+", choices=COMPILE_MODES, dest="compile_modes",
                        help="time every method in each of these train.compile modes, side by side "
                             "(default: as configured)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="smoke config and a tiny budget (CI)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")


def env_only_throughput(envs: list[Any], num_tasks: int, steps: int, rounds: int, seed: int) -> float:
    """Vector steps per second (of every env together) with random actions, median over rounds.
    Every env is sent its actions before any is waited on, as the trainer does."""
    runners = [VectorEnvRunner(env, num_tasks) for env in envs]
    for runner in runners:
        runner.reset_all()
    rng = np.random.default_rng(seed)
    action_dim = envs[0].single_action_space.shape[0]
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            for runner in runners:
                runner.step_async(rng.uniform(-1, 1, (num_tasks, action_dim)))
            for runner in runners:
                _, _, terminated, truncated = runner.step_wait()
                done = terminated | truncated
                if done.any():
                    runner.reset_finished(done)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def kernels_per_update(training: Training) -> int:
    """Kernels one update executes on the GPU path (no host reads), as it runs in its mode
    (``timing.count_executed``): on a GPU, where small kernels cost their launch, a measure of
    the update's cost that this machine can take whatever its device. Two extra updates: the
    first outside the count (first-call work on this path)."""
    with sync_free():
        training.learn(diagnostics=False)
        return count_executed(lambda: training.learn(diagnostics=False), training.device)


def train_steps(training: Training, steps: int) -> None:
    """``steps`` steps of the training loop (``train.train_loop``, without its progress bar)."""
    train_loop(training, progress=False, stop_at_step=training.step + steps - 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = "smoke" if args.quick else args.config
    steps = 10 if args.quick else args.steps
    rounds = 2 if args.quick else args.rounds
    warmup = 2 * steps
    batch = load_config(config, args.overrides, device=args.device).train.batch_size_per_task
    overrides = [
        *args.overrides,
        f"train.warmup_steps={warmup}",
        f"train.buffer_capacity_per_task={max(warmup + 4 * steps, batch)}",  # what the timed blocks store
        # the loop's own evaluations and its end stay out of the timed blocks
        "train.eval_every=0",
        f"train.total_steps={PROTOCOL_STEPS}",
    ]
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    seeds = list(range(args.seeds))
    base = load_config(config, overrides, device=args.device)
    architectures = args.architectures or [base.agent.architecture]
    tasks = task_names(base.env)
    envs = [make_vector_env(base.env, seed) for seed in seeds]  # one per seed, shared by every variant
    modes = args.compile_modes or [None]  # train.compile; None: as configured
    profile_compiled_kernels()
    trainings: dict[tuple[str, str, str | None], Training] = {}
    for variant in itertools.product(architectures, args.methods, modes):
        architecture, method, mode = variant
        switch = [f"agent.architecture={architecture}"] + ([] if mode is None else [f"train.compile={mode}"])
        runs = [(load_config(config, [*overrides, *switch], device=args.device, method=method, seed=seed),
                 Path("unused"), None) for seed in seeds]  # fmt: skip
        trainings[variant] = Training(runs, envs=envs, eval_envs=envs, log=False)
    lead = next(iter(trainings.values()))
    device = lead.device
    compile_note = " ".join(args.compile_modes) if args.compile_modes else lead.compile_mode
    print(f"device: {device}  config: {config}  tasks: {len(tasks)}  seeds together: {len(seeds)}  "
          f"vector strategy: {base.env.vector_strategy}  overlap: {lead.overlap}  compile: {compile_note}  "
          f"networks: {base.agent.hidden_sizes}  batch: {base.train.batch_size_per_task}/task  "
          f"torch threads: {torch.get_num_threads()}")  # fmt: skip
    env_sps = env_only_throughput(envs, len(tasks), steps, rounds, base.seed)

    kernels = {}
    for variant, training in trainings.items():  # random-action warm-up fills each replay buffer
        train_steps(training, warmup)
        training.learn(diagnostics=False)  # first-call overheads (and compiling) out of the timings
        kernels[variant] = kernels_per_update(training)
    update_ms: dict[tuple, list[float]] = {v: [] for v in trainings}
    train_sps: dict[tuple, list[float]] = {v: [] for v in trainings}
    for _ in range(rounds):  # interleaved: a noisy neighbour slows every variant alike
        for variant, training in trainings.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                training.learn(diagnostics=False)
            sync(device)
            update_ms[variant].append((time.perf_counter() - start) / steps * 1e3)
        for variant, training in trainings.items():
            sync(device)
            start = time.perf_counter()
            train_steps(training, steps)
            sync(device)
            train_sps[variant].append(steps / (time.perf_counter() - start))
    for env in envs:
        env.close()

    batches = math.ceil(PROTOCOL_SEEDS / len(seeds))  # seed batches run one after another
    update = {v: statistics.median(times) for v, times in update_ms.items()}
    rows = []
    for (architecture, method, mode), training in trainings.items():
        ls = (architecture, "ls", mode)  # ls of the same architecture and mode
        eager = (architecture, method, "off") if mode not in (None, "off") else None
        upd, sps = update[(architecture, method, mode)], statistics.median(train_sps[(architecture, method, mode)])
        count = kernels[(architecture, method, mode)]
        rows.append({
            "architecture": architecture, "method": method, "compile": training.compile_mode, "update_ms": upd,
            "update_over_ls": upd / update[ls] if ls in update else None, "kernels_per_update": count,
            "kernels_over_ls": count / kernels[ls] if ls in kernels else None,
            "update_over_eager": upd / update[eager] if eager in update else None,
            "train_steps_per_s": sps, "train_over_env_only": sps / env_sps,
            "protocol_hours_10_seeds": batches * PROTOCOL_STEPS / sps / 3600,
        })  # fmt: skip
    env_steps = env_sps * len(tasks) * len(seeds)
    print(f"\nenv-only (random actions): {env_sps:.1f} vector steps/s ({env_steps:.0f} env steps/s)")
    plan = "one after another" if len(seeds) == 1 else f"{batches} batch(es) of {len(seeds)}"
    width = max(18, *(len(r["architecture"]) + len(r["method"]) + 14 for r in rows))
    print(f"\n{'variant':<{width}} {'update ms':>10} {'/ ls':>7} {'/ eager':>8} {'kernels':>8} {'/ ls':>6} "
          f"{'train steps/s':>14} {'/ env-only':>11} {'10 seeds x 2M, ' + plan:>34}")  # fmt: skip
    for r in rows:
        keys = ("update_over_ls", "update_over_eager", "kernels_over_ls")
        ratios = ["-" if r[key] is None else f"{r[key]:.2f}x" for key in keys]
        label = r["method"] + (f" [{r['architecture']}]" if len(architectures) > 1 else "")
        label += f" ({r['compile']})"
        print(f"{label:<{width}} {r['update_ms']:>10.2f} {ratios[0]:>7} {ratios[1]:>8} {r['kernels_per_update']:>8} "
              f"{ratios[2]:>6} {r['train_steps_per_s']:>14.1f} {r['train_over_env_only']:>10.2f}x "
              f"{r['protocol_hours_10_seeds']:>31.1f} h")  # fmt: skip
    print(
        "\n(medians over interleaved timed blocks; a step is one vector step of every seed; kernels: what one "
        "update (sampling included) executes on the GPU path as its mode runs it: the eager parts' operator calls "
        "and a compiled graph's generated and external kernels; on CUDA the kernel launches, a CUDA graph one; "
        "the wall-clock column "
        "extrapolates the measured training throughput of this config to 10 seeds of 2M steps, run in batches "
        "of --seeds, evaluations excluded)"
    )
    return {"device": str(device), "config": config, "tasks": len(tasks), "seeds": len(seeds),
            "compile_modes": args.compile_modes, "steps_per_block": steps, "rounds": rounds,
            "env_only_steps_per_s": env_sps, "methods": rows}  # fmt: skip
