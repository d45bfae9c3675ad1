"""``python -m rl_mtl.sweep``: a grid of (method, seed) runs as local processes.

    python -m rl_mtl.sweep --methods nashmtl fairgrad pcgrad cagrad ls --seeds 0-9 --config mt10 --jobs 4

One run directory per (method, seed): ROOT/<config>/<method>/seed<seed>, the same place
``python -m rl_mtl.train`` uses by default. Finished runs are skipped, interrupted ones resumed
from their checkpoint, a run that died before its first checkpoint is started again (its first
attempt's logs kept aside), and a run another process is writing is left alone. Each job's console output goes to
``<run dir>.log``. At the end it prints the status of every run and the evaluation summary.
Ctrl-C stops the jobs the way the trainer does (each saves at its next episode boundary).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .aggregators import METHODS
from .checkpoint import CheckpointError, saved_steps
from .config import ConfigError, load_config, parse_seeds
from .run_dir import CONFIG_NAME, default_run_dir, lock_holder, runs_root


@dataclass
class Job:
    method: str
    seed: int
    run_dir: Path
    action: str  # "start", "resume", "skip" (finished) or "busy" (another process writes it)
    returncode: int | None = None
    seconds: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".log")


def plan(methods: list[str], seeds: list[int], config: str, overrides: list[str], root: Path) -> list[Job]:
    jobs = []
    for method in methods:
        for seed in seeds:
            cfg = load_config(config, overrides, method=method, seed=seed)  # validates before anything runs
            run_dir = default_run_dir(root, config, method, seed)
            steps = saved_steps(run_dir)
            if lock_holder(run_dir) is not None:
                action = "busy"
            elif steps and max(steps) >= cfg.train.total_steps:
                action = "skip"
            else:  # resuming a run that died before its first checkpoint starts it again
                action = "resume" if (run_dir / CONFIG_NAME).is_file() else "start"
            jobs.append(Job(method, seed, run_dir, action))
    return jobs


def command(job: Job, config: str, overrides: list[str], device: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "rl_mtl.train", "--no-progress"]
    if job.action == "resume":
        cmd += ["--resume", str(job.run_dir)]
    else:
        cmd += ["--config", config, "--method", job.method, "--seed", str(job.seed), "--run-dir", str(job.run_dir)]
    for text in overrides:
        cmd += ["--set", text]
    if device:
        cmd += ["--device", device]
    return cmd


def run_jobs(jobs: list[Job], config: str, overrides: list[str], device: str | None, parallel: int) -> None:
    todo = [j for j in jobs if j.action in ("start", "resume")]
    threads = max(1, (os.cpu_count() or 1) // parallel)  # no oversubscription of the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    done = 0
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True
        print("\nstopping: each job saves at its next episode boundary (Ctrl-C again to kill them)", file=sys.stderr)
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)
    try:
        while todo or running:
            while todo and len(running) < parallel and not stopping:
                job = todo.pop(0)
                job.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = job.log_path.open("a")
                proc = subprocess.Popen(command(job, config, overrides, device), stdout=log, stderr=subprocess.STDOUT,
                                        env=env)  # fmt: skip
                log.close()
                running[proc] = (job, time.time())
                print(f"{job.action:>6} {job.method} seed {job.seed} -> {job.run_dir} (log: {job.log_path})")
            if stopping:
                todo.clear()
            for proc in [p for p in running if p.poll() is not None]:
                job, started = running.pop(proc)
                job.returncode, job.seconds = proc.returncode, time.time() - started
                done += 1
                total = done + len(todo) + len(running)
                status = "done" if job.returncode == 0 else f"FAILED (exit {job.returncode}; see {job.log_path})"
                print(f"[{done}/{total}] {job.method} seed {job.seed}: {status} after {job.seconds / 60:.1f} min")
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in running:
            proc.kill()
        raise
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, required=True)
    parser.add_argument("--seeds", type=parse_seeds, required=True, help="e.g. 0-9 or 0,3,5-7")
    parser.add_argument("--config", default="mt10", help="config file or preset (default: mt10)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every run (repeatable)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--root", type=Path, default=None, help="runs root (default: $RL_MTL_RUNS or runs)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    root = args.root or runs_root()
    if root.exists() and not root.is_dir():
        print(f"error: --root {root} is a file, not a directory; choose another root", file=sys.stderr)
        return 2
    try:
        jobs = plan(args.methods, args.seeds, args.config, args.overrides, root)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = [j for j in jobs if j.action == "skip"]
    for job in (j for j in jobs if j.action == "busy"):
        print(f"{job.run_dir} is being written by {lock_holder(job.run_dir)}; this sweep leaves it alone")
    todo = [j for j in jobs if j.action in ("start", "resume")]
    print(f"{len(jobs)} runs: {len(todo)} to run ({sum(j.action == 'resume' for j in jobs)} resumed), "
          f"{len(skipped)} already finished")  # fmt: skip
    try:
        run_jobs(jobs, args.config, args.overrides, args.device, args.jobs)
    except KeyboardInterrupt:
        print("killed; interrupted runs resume from their last checkpoint", file=sys.stderr)
        return 130
    print("\nstatus:")
    for job in jobs:
        print(f"  {job.method:<9} seed {job.seed:<3} {job_status(job):<24} {job.run_dir}")
    finished = [str(j.run_dir) for j in jobs if j.action == "skip" or j.returncode == 0]
    if finished:
        from .evaluate import main as evaluate_main

        print()
        evaluate_main(finished)
    failed = [j for j in todo if j.returncode not in (0, None)]
    if any(j.returncode is None for j in todo) or (failed and all(j.returncode == 130 for j in failed)):
        return 130  # stopped: what did not finish resumes on the next run of the sweep
    return 1 if failed or any(j.action == "busy" for j in jobs) else 0


def job_status(job: Job) -> str:
    if job.action == "skip":
        return "finished earlier"
    if job.action == "busy":
        return "written by another process"
    if job.returncode is None:
        return "not started"
    if job.returncode == 130:
        return "interrupted (resumable)"
    return "ok" if job.returncode == 0 else f"FAILED (exit {job.returncode})"


if __name__ == "__main__":
    sys.exit(main())
