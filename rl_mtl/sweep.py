"""``python -m rl_mtl.sweep``: a grid of (method, seed) runs, as local processes or Ray tasks.

    python -m rl_mtl.sweep --methods nashmtl fairgrad pcgrad cagrad ls --seeds 0-9 --config mt10 --jobs 4
    python -m rl_mtl.sweep ... --backend ray --address auto --seeds-per-job 10 --gpus-per-job 1

One run directory per (method, seed): ROOT/<config>/<method>/seed<seed>, where
``python -m rl_mtl.train`` puts it. A job trains ``--seeds-per-job`` seeds of one method
together (a population: how one GPU stays busy) in one ``rl_mtl.train`` process. Finished runs are
skipped, interrupted ones resumed from their checkpoints, runs that never reached a checkpoint
started again (their first attempt's files kept aside), and runs another process is writing left
alone. A job decides whether it starts or resumes when it runs, so a job that Ray retries after
its worker or node was lost resumes from its last checkpoint. Each job's console output goes to
``ROOT/<config>/<method>/<seeds>.log``. Ctrl-C stops every job at its next episode boundary,
with a checkpoint (Ctrl-C again kills them). The sweep ends with the status of every run and the
evaluator's summary.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import saved_steps
from .config import ConfigError, load_config, parse_seeds
from .envs import task_names
from .metrics import METRICS_NAME
from .registry import METHODS
from .run_dir import CONFIG_NAME, CheckpointError, default_run_dir, lock_holder, runs_root

EXIT_INTERRUPTED = 130
RAY_INSTALL = "pip install -c constraints.txt -e '.[ray]'"


@dataclass
class Job:
    """Seeds of one method trained together; ``action`` is "run", "skip" (every seed finished)
    or "busy" (another process writes one of them)."""

    method: str
    seeds: list[int]
    run_dirs: list[Path]
    action: str
    total_steps: int = 0
    returncode: int | None = None
    seconds: float = 0.0
    note: str = ""
    started: float = field(default=0.0, repr=False)

    @property
    def label(self) -> str:
        return f"{self.method} seed{'s' if len(self.seeds) > 1 else ''} {','.join(map(str, self.seeds))}"

    @property
    def log_path(self) -> Path:
        return self.run_dirs[0].parent / f"seed{'-'.join(map(str, self.seeds))}.log"


def plan(methods: list[str], seeds: list[int], config: str, overrides: list[str], root: Path,
         seeds_per_job: int) -> list[Job]:  # fmt: skip
    """The jobs of the grid: each method's seeds that still train, in groups of ``seeds_per_job``
    (seeds resumed together must be at one step: they are grouped by it)."""
    jobs = []
    for method in methods:
        pending: dict[int | None, list[int]] = {}  # the latest checkpoint's step (None: none) -> seeds
        total = 0
        for seed in seeds:
            cfg = load_config(config, overrides, method=method, seed=seed)  # validates before anything runs
            total = cfg.train.total_steps
            run_dir = default_run_dir(root, config, method, seed)
            steps = saved_steps(run_dir)
            holder = lock_holder(run_dir)
            if holder is not None:
                jobs.append(Job(method, [seed], [run_dir], "busy", total, note=f"written by {holder}"))
            elif steps and max(steps) >= total:
                jobs.append(Job(method, [seed], [run_dir], "skip", total))
            else:
                pending.setdefault(max(steps) if steps else None, []).append(seed)
        for group in pending.values():
            for i in range(0, len(group), seeds_per_job):
                chunk = group[i : i + seeds_per_job]
                dirs = [default_run_dir(root, config, method, s) for s in chunk]
                jobs.append(Job(method, chunk, dirs, "run", total))
    return jobs


def train_argv(job: Job, config: str, overrides: list[str], device: str | None) -> list[str]:
    """The train command of a job, decided when it runs: resume its run directories if they hold
    runs (``train --resume`` also starts again those that never reached a checkpoint), else start
    its seeds together."""
    argv = [sys.executable, "-m", "rl_mtl.train", "--no-progress"]
    if all((d / CONFIG_NAME).is_file() for d in job.run_dirs):
        argv += ["--resume", *map(str, job.run_dirs)]
    else:  # a job killed while it created its directories: start again from nothing
        for run_dir in job.run_dirs:
            for partial in (CONFIG_NAME, METRICS_NAME, "run.json"):
                (run_dir / partial).unlink(missing_ok=True)
        argv += ["--config", config, "--method", job.method, "--seeds", ",".join(map(str, job.seeds)),
                 "--run-dir", str(job.run_dirs[0].parent)]  # fmt: skip
    for text in overrides:
        argv += ["--set", text]
    return argv + (["--device", device] if device else [])


def start_job(job: Job, config: str, overrides: list[str], device: str | None, threads: int) -> subprocess.Popen:
    """The job's ``rl_mtl.train`` process, logging to ``job.log_path``, with ``threads`` CPU threads;
    it dies with this process (a lost worker leaves no orphan writing the run)."""
    job.run_dirs[0].parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with job.log_path.open("a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}, started by pid {os.getpid()}\n")
        log.flush()
        # its own session: a terminal's Ctrl-C reaches only the sweep, which signals each job once
        return subprocess.Popen(train_argv(job, config, overrides, device), stdout=log, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=_die_with_parent, start_new_session=True)  # fmt: skip


LOCK_WAIT_S = 300  # longer than an NFS lease (90 s by default): a lost node's locks are released by then


def run_job(job: Job, config: str, overrides: list[str], device: str | None, threads: int) -> int:
    """Run one job to its end (a Ray task's body); Ctrl-C (KeyboardInterrupt: Ray's cancel) asks
    its run to save at the next episode boundary and stop. A retry after a lost node may find its
    run directories still locked by the lost process (shared storage releases a dead client's
    locks when its lease ends): it waits for that, up to ``LOCK_WAIT_S``."""
    deadline = time.time() + LOCK_WAIT_S
    while time.time() < deadline and any(lock_holder(d) is not None for d in job.run_dirs):
        time.sleep(5)
    proc = start_job(job, config, overrides, device, threads)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        return proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when its parent dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- progress -------------------------------------------------------------------------------------------
def last_step(run_dir: Path) -> int:
    """The last step a run logged (its metrics file's last line), 0 before any."""
    try:
        with (run_dir / METRICS_NAME).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(line.split(b'"step": ', 1)[1].split(b",", 1)[0])
        except (IndexError, ValueError):
            continue
    return 0


class Progress:
    """One line per job state change, and a bar: jobs done, steps done over all runs, ETA."""

    def __init__(self, jobs: list[Job]) -> None:
        from tqdm import tqdm

        self.jobs = jobs
        self.total = sum(j.total_steps * len(j.seeds) for j in jobs)
        self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, mininterval=2.0, smoothing=0.1)
        self.refresh()

    def event(self, job: Job, what: str) -> None:
        self.bar.write(f"{time.strftime('%H:%M:%S')} {job.label}: {what}")

    def refresh(self) -> None:
        done = sum(min(last_step(d), j.total_steps) for j in self.jobs for d in j.run_dirs)
        finished = sum(j.returncode == 0 for j in self.jobs)
        failed = sum(j.returncode not in (None, 0) for j in self.jobs)
        running = sum(j.started > 0 and j.returncode is None for j in self.jobs)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"jobs {finished}/{len(self.jobs)} done, {running} running, {failed} failed",
                                 refresh=False)  # fmt: skip

    def close(self) -> None:
        self.refresh()
        self.bar.close()


# -- backends ----------------------------------------------------------------------------------------
class Stop:
    """Ctrl-C / SIGTERM: the first asks every job to save and stop, the second kills them."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping: each job saves at its next episode boundary (Ctrl-C again to kill them)", file=sys.stderr)

    def restore(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def run_local(jobs: list[Job], config: str, overrides: list[str], device: str | None, parallel: int) -> None:
    todo = [j for j in jobs if j.action == "run"]
    threads = max(1, (os.cpu_count() or 1) // parallel)  # no oversubscription of the cores
    running: dict[subprocess.Popen, Job] = {}
    progress, stop = Progress(todo), Stop()
    signalled: set[subprocess.Popen] = set()
    try:
        while (todo and not stop.requested) or running:
            while todo and len(running) < parallel and not stop.requested:
                job = todo.pop(0)
                running[start_job(job, config, overrides, device, threads)], job.started = job, time.time()
                progress.event(job, f"running (log: {job.log_path})")
            if stop.requested:  # once per job: a second signal would make it exit without saving
                for proc in running.keys() - signalled:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                        signalled.add(proc)
            for proc in [p for p in running if p.poll() is not None]:
                job = running.pop(proc)
                job.returncode, job.seconds = proc.returncode, time.time() - job.started
                progress.event(job, job_status(job) + f" after {job.seconds / 60:.1f} min")
            progress.refresh()
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in running:
            proc.kill()
        raise
    finally:
        stop.restore()
        progress.close()


def run_ray(jobs: list[Job], config: str, overrides: list[str], device: str | None, address: str | None,
            cpus: float, gpus: float, retries: int) -> None:  # fmt: skip
    """Every job as a Ray task asking for ``cpus`` and ``gpus``, on the cluster at ``address``
    (or on one started here for the sweep); Ray retries a task whose worker or node was lost,
    up to ``retries`` times."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--backend ray needs Ray: {RAY_INSTALL}") from None
    todo = [j for j in jobs if j.action == "run"]
    context = ray.init(address=address, include_dashboard=False, log_to_driver=False,
                       **({} if address else {"num_cpus": os.cpu_count()}))  # fmt: skip
    dashboard = getattr(context, "dashboard_url", None)
    print(f"Ray cluster: {address or 'started here'}" + (f"; dashboard: http://{dashboard}" if dashboard else ""))
    task = ray.remote(run_job).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    refs = {task.remote(job, config, overrides, device, max(1, int(cpus))): job for job in todo}
    progress, stop = Progress(todo), Stop()
    for job in todo:
        job.started = time.time()
        progress.event(job, f"submitted (log: {job.log_path})")
    cancelled = False
    try:
        pending = list(refs)
        while pending:
            if stop.requested and not cancelled:
                for ref in pending:
                    ray.cancel(ref)  # a KeyboardInterrupt in the task: its run saves and stops
                cancelled = True
            ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            for ref in ready:
                job = refs[ref]
                try:
                    job.returncode = ray.get(ref)
                except ray.exceptions.TaskCancelledError:
                    job.returncode = EXIT_INTERRUPTED
                except ray.exceptions.RayError as err:
                    job.returncode, job.note = -1, f"{type(err).__name__} after {retries} retries"
                job.seconds = time.time() - job.started
                progress.event(job, job_status(job) + f" after {job.seconds / 60:.1f} min")
            progress.refresh()
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        stop.restore()
        progress.close()
        ray.shutdown()


# -- the command line ------------------------------------------------------------------------------------
def job_status(job: Job) -> str:
    if job.action == "skip":
        return "finished earlier"
    if job.action == "busy":
        return job.note or "written by another process"
    if job.returncode is None:
        return "not started"
    if job.returncode == EXIT_INTERRUPTED:
        return "interrupted (resumable)"
    if job.returncode == 0:
        return "ok"
    return f"FAILED ({job.note or f'exit {job.returncode}'}; see {job.log_path})"


def check_root(root: Path) -> None:
    """The root must be a directory this process can write (on a cluster: storage every node sees)."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--root {root} is a file, not a directory; choose another root")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as err:
        raise ConfigError(f"--root {root} cannot be written ({err.strerror}); choose a writable root") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl_mtl.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), required=True)
    parser.add_argument("--seeds", type=parse_seeds, required=True, help="e.g. 0-9 or 0,3,5-7")
    parser.add_argument("--config", default="mt10", help="config file or preset (default: mt10)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every run (repeatable)")  # fmt: skip
    parser.add_argument("--seeds-per-job", type=int, default=1, help="seeds of a method trained together per job")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    root_help = "runs root (default: $RL_MTL_RUNS or runs); on a cluster, storage all nodes see"
    parser.add_argument("--root", type=Path, default=None, help=root_help)
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--jobs", type=int, default=1, help="local backend: jobs at a time (default 1)")
    parser.add_argument("--address", help="ray backend: the cluster (auto, or host:port); default: start one here")
    cpus_help = "ray backend: CPUs a job asks for (default: one per env process; 1 with sync envs)"
    parser.add_argument("--cpus-per-job", type=float, default=None, help=cpus_help)
    parser.add_argument(
        "--gpus-per-job", type=float, default=0.0, help="ray backend: GPUs a job asks for (fractions allowed)"
    )
    parser.add_argument("--retries", type=int, default=3, help="ray backend: times a lost job is retried (default 3)")
    args = parser.parse_args(argv)
    for name in ("jobs", "seeds_per_job"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpus_per_job < 0 or args.retries < 0 or (args.cpus_per_job is not None and args.cpus_per_job <= 0):
        parser.error("--gpus-per-job and --retries must be >= 0, --cpus-per-job > 0")
    root = args.root or runs_root()
    try:
        check_root(root)
        jobs = plan(args.methods, args.seeds, args.config, args.overrides, root, args.seeds_per_job)
        todo = [j for j in jobs if j.action == "run"]
        count = {action: sum(len(j.seeds) for j in jobs if j.action == action) for action in ("skip", "busy")}
        print(f"{sum(len(j.seeds) for j in jobs)} runs in {len(todo)} job(s) to run, {count['skip']} finished "
              f"earlier, {count['busy']} written elsewhere")  # fmt: skip
        if args.backend == "ray":
            env = load_config(args.config, args.overrides).env
            processes = len(task_names(env)) * args.seeds_per_job  # an async vector env: a process per task
            cpus = args.cpus_per_job or (processes if env.vector_strategy == "async" else 1)
            run_ray(jobs, args.config, args.overrides, args.device, args.address, cpus, args.gpus_per_job, args.retries)
        else:
            run_local(jobs, args.config, args.overrides, args.device, args.jobs)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("killed; interrupted runs resume from their last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    print("\nstatus:")
    for job in jobs:
        for seed, run_dir in zip(job.seeds, job.run_dirs, strict=True):
            print(f"  {job.method:<9} seed {seed:<3} {job_status(job):<28} {run_dir}")
    finished = [str(d) for j in jobs if j.action == "skip" or j.returncode == 0 for d in j.run_dirs]
    if finished:
        from .evaluate import main as evaluate_main

        print()
        evaluate_main(finished)
    failed = [j for j in todo if j.returncode not in (0, None)]
    if any(j.returncode is None for j in todo) or (failed and all(j.returncode == EXIT_INTERRUPTED for j in failed)):
        return EXIT_INTERRUPTED  # stopped: what did not finish resumes on the next run of the sweep
    return 1 if failed or any(j.action == "busy" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
