"""``python -m rl_mtl.train``: multi-task SAC on Meta-World with gradient aggregation.

``train_loop`` is the whole algorithm, top to bottom: act, step the envs, store, update, log,
evaluate, checkpoint, for a population of one or more seeds (``training.Training`` holds its
parts; ``resume`` says which runs a command trains). Checkpoints are taken at episode
boundaries (all tasks' episodes end together: fixed length, no termination), before the next
goals are drawn, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from .agents import NonFiniteLossError, to_host
from .buffers import ReplayError
from .config import ConfigError, parse_seeds
from .envs import EnvError
from .registry import METHODS
from .resume import RunSpec, check_trainable_together, new_runs, resumed_runs
from .run_dir import CheckpointError, RunDirError, describe_write_error, lock_run_dir, unlock_run_dirs
from .training import Training

EXIT_INTERRUPTED = 130


def train_loop(tr: Training, progress: bool = True, stop_at_step: int | None = None) -> int:
    """Train the population up to ``train.total_steps``. Returns 0, or EXIT_INTERRUPTED once a
    requested stop (Ctrl-C, SIGTERM) is saved. ``stop_at_step`` (tests): return EXIT_INTERRUPTED
    once that step is done, saving nothing more, as ``kill -9`` would."""
    t = tr.cfg.train
    bar = progress_bar(t.total_steps, tr.step, progress)
    obs = tr.to_device(tr.envs.obs)  # [S, K, obs_dim]
    try:
        while tr.step < t.total_steps:
            learning = tr.step >= t.warmup_steps
            diagnostics = (tr.step + 1) % t.log_every == 0
            action = tr.population.act(obs) if learning else tr.random_actions()
            tr.envs.step_async(to_host(action))
            if learning and tr.overlap:  # async envs step while the update runs (on the replay before this step)
                tr.learn(diagnostics)
            next_obs, reward, terminated, done = tr.receive()
            tr.store(obs, action, reward, next_obs, terminated)
            if learning and not tr.overlap:
                tr.learn(diagnostics)
            tr.step += 1
            bar.update(1)
            logs, final, boundary = tr.step % t.log_every == 0, tr.step == t.total_steps, bool(done.all())
            if logs or done.any() or final:
                tr.check_skipped_updates()  # before any seed logs or saves
            if logs:
                bar.set_postfix_str(f"{tr.log_training():.1f} steps/s", refresh=False)
            if tr.eval_due():
                bar.set_postfix_str(f"eval success {tr.log_evaluation():.2f}", refresh=False)
            if done.any():
                tr.log_episodes(done)
            if final or (boundary and (tr.stop_requested or tr.step - tr.last_checkpoint_step >= t.checkpoint_every)):
                tr.save(at_boundary=boundary)
            if tr.stop_requested and boundary and not final:
                bar.close()
                dirs = " ".join(str(d) for d in tr.run_dirs)
                print(f"\nstopped at step {tr.step}; checkpoint saved. Resume with: "
                      f"python -m rl_mtl.train --resume {dirs}", file=sys.stderr)  # fmt: skip
                return EXIT_INTERRUPTED
            obs = tr.to_device(tr.envs.reset_finished(done)) if done.any() and not final else next_obs
            if stop_at_step is not None and tr.step > stop_at_step:
                return EXIT_INTERRUPTED
    finally:
        bar.close()
        for logger in tr.loggers:
            logger.flush()
    return 0


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0,
                disable=not enabled, smoothing=0.05)  # fmt: skip


class StartupInterrupted(BaseException):
    """Ctrl-C or SIGTERM before training began (a BaseException, like KeyboardInterrupt, so that no
    library's ``except Exception`` swallows it)."""


def run(runs: list[RunSpec], progress: bool = True, stop_at_step: int | None = None) -> int:
    """Train one run, or several seeds of one config together, each in its own run directory
    (new, or resumed from its checkpoint), as the directories' only writer. Ctrl-C or SIGTERM
    during start-up stops it before anything is trained; during training it asks for a stop at
    the next episode boundary (with a checkpoint), and a second one exits at once."""
    check_trainable_together(runs)
    run_dirs = [run_dir for _, run_dir, _ in runs]
    training: Training | None = None

    def on_signal(signum: int, frame: Any) -> None:
        if training is None or os.getpid() != training_pid:
            _interrupt_start_up(signum, frame)
        if training.stop_requested:
            raise KeyboardInterrupt
        training.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: finishing the current episode, then saving a checkpoint (send it "
              "again to exit at once, keeping the previous checkpoint)", file=sys.stderr)  # fmt: skip

    training_pid = os.getpid()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        for run_dir in run_dirs:
            lock_run_dir(run_dir)
        training = Training(runs)
        return train_loop(training, progress, stop_at_step)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if training is not None:
            training.close()
        unlock_run_dirs(run_dirs)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rl_mtl.train",
        description="Train multi-task SAC on Meta-World (MT10 by default), combining per-task gradients "
        "with a gradient-aggregation method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m rl_mtl.train --method nashmtl                 # the full MT10 protocol\n"
        "  python -m rl_mtl.train --config smoke --method pcgrad   # a one-minute smoke run\n"
        "  python -m rl_mtl.train --config mt10-paper --method cagrad --seed 3\n"
        "  python -m rl_mtl.train --set env.benchmark=MT1 --set env.tasks=[reach-v3]\n"
        "  python -m rl_mtl.train --method fairgrad --seeds 0-9    # ten seeds together, one process\n"
        "  python -m rl_mtl.train --resume runs/mt10/nashmtl/seed0\n"
        "  python -m rl_mtl.train --resume runs/mt10/nashmtl/seed*  # continue seeds together\n"
        "Ctrl-C (or SIGTERM) finishes the current episode, saves a checkpoint and exits;\n"
        "a second Ctrl-C exits at once, keeping the previous checkpoint.",
    )
    parser.add_argument("--method", choices=list(METHODS), help="gradient aggregation method (default: nashmtl)")
    parser.add_argument("--config", help="YAML config file or preset name (default: mt10; presets: rl_mtl/configs)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="random seed (default: 0)")
    seeds.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar="LIST",
        help="train several seeds together in this process, e.g. 0-9 or 0,3,5-7; each seed gets its own "
        "run directory (README: Several seeds in one process)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training device (default: auto)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run directory (default: $RL_MTL_RUNS or runs, then /<config>/<method>/seed<seed>); with --seeds, "
        "the parent of one seed<seed> directory per seed",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint; several RUN_DIRs (seeds of one config, at the "
        "same step) continue together in this process",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.total_steps=100000 (repeatable)",
    )
    det = parser.add_mutually_exclusive_group()
    det.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (default on CPU; slower on CUDA)",
    )
    det.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_runs(args: argparse.Namespace, lock: bool = True) -> list[RunSpec]:
    """The runs to train: one, several seeds (--seeds), or several resumed run directories;
    with ``lock``, this process becomes their directories' only writer first."""
    explicit = {"method": args.method, "seed": args.seed, "device": args.device, "deterministic": args.deterministic}
    if args.resume is not None:
        if args.seeds is not None:
            raise ConfigError("--seeds starts new runs; to continue seeds together pass their directories to --resume")
        runs = resumed_runs(args.resume, args.config, args.overrides, explicit, lock)
    else:
        seeds = args.seeds if args.seeds is not None else [args.seed]
        several = args.seeds is not None
        runs = new_runs(args.config or "mt10", args.overrides, explicit, seeds, args.run_dir, several, lock)
    check_trainable_together(runs)
    return runs


def _interrupt_start_up(signum: int, _frame: Any) -> None:
    if multiprocessing.parent_process() is not None:  # an env worker forked with our handlers: just end
        os._exit(128 + signum)
    raise StartupInterrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs: list[RunSpec] = []
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _interrupt_start_up) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main \
        else {}  # fmt: skip
    try:
        runs = resolve_runs(args, lock=not args.print_config)
        if args.print_config:
            print(yaml.safe_dump(runs[0][0].to_dict(), sort_keys=False), end="")
            return 0
        for _, run_dir, state in runs:
            if state is None:
                print(f"run directory: {run_dir}", file=sys.stderr)
            else:
                print(f"resuming {run_dir} from step {state['step']}", file=sys.stderr)
        return run(runs, progress=not args.no_progress)
    except (ConfigError, EnvError, CheckpointError, NonFiniteLossError, RunDirError, ReplayError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write that failed outside a checkpoint: a log, the config, run.json
        print(f"error: {describe_write_error(err)}", file=sys.stderr)
        return 2
    except StartupInterrupted as err:
        print(f"\n{err}: stopped during start-up, before training; no checkpoint was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        unlock_run_dirs([run_dir for _, run_dir, _ in runs])
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
