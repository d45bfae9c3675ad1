"""Sweeps: the grid's jobs (seeds of a method trained together), the local backend, and the Ray
backend on a local cluster: the same run directories as the local backend, and a job whose worker
was killed retried and resumed exactly."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rl_mtl.checkpoint import CHECKPOINT_NAME, save_checkpoint
from rl_mtl.metrics import read_metrics
from rl_mtl.sweep import Job, job_status, main, plan, train_argv

TINY = ["env.benchmark=custom", "env.tasks=[reach-v3, window-close-v3]", "env.max_episode_steps=25",
        "train.total_steps=100", "train.warmup_steps=50", "train.checkpoint_every=50", "train.eval_every=50",
        "train.eval_episodes=1", "train.log_every=25"]  # fmt: skip


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _comparable(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def test_the_plan_groups_seeds_into_jobs_by_their_state(tmp_path):
    root = tmp_path / "runs"
    for seed, step in ((2, 50), (3, 50), (4, 100)):  # two resumable at step 50, one finished
        run_dir = root / "smoke" / "ls" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        save_checkpoint(run_dir / CHECKPOINT_NAME, {"step": step})
    jobs = plan(["ls"], [0, 1, 2, 3, 4, 5], "smoke", TINY, root, seeds_per_job=2)
    assert sorted((j.action, tuple(j.seeds)) for j in jobs) == [
        ("run", (0, 1)), ("run", (2, 3)), ("run", (5,)), ("skip", (4,))
    ]  # fmt: skip
    fresh = next(j for j in jobs if j.seeds == [0, 1])
    argv = train_argv(fresh, "smoke", TINY, None)
    assert argv[argv.index("--seeds") + 1] == "0,1" and argv[argv.index("--run-dir") + 1] == str(root / "smoke" / "ls")


def test_job_states_read_as_words():
    assert job_status(Job("ls", [0], [Path("r")], "run")) == "not started"
    assert job_status(Job("ls", [0], [Path("r")], "run", returncode=130)) == "interrupted (resumable)"
    assert job_status(Job("ls", [0], [Path("r")], "run", returncode=1)).startswith("FAILED (exit 1")
    assert job_status(Job("ls", [0], [Path("r")], "skip")) == "finished earlier"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray cluster of one node on 127.0.0.1 with 2 CPUs, stopped afterwards."""
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [
        ray_bin,
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--temp-dir",
        tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    ]  # fmt: skip (a short path: Ray's sockets live there)
    result = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_the_ray_backend_makes_the_local_backend_s_run_directories(tmp_path, ray_cluster):
    grid = ["--methods", "ls", "pcgrad", "--seeds", "0-1", "--config", "smoke", "--seeds-per-job", "2", *_sets(TINY)]
    assert main([*grid, "--root", str(tmp_path / "local")]) == 0
    assert main([*grid, "--root", str(tmp_path / "ray"), "--backend", "ray", "--address", ray_cluster]) == 0
    for method in ("ls", "pcgrad"):
        for seed in (0, 1):
            local, ray = (tmp_path / root / "smoke" / method / f"seed{seed}" for root in ("local", "ray"))
            assert _comparable(ray) == _comparable(local), f"{method} seed {seed}"
            assert json.loads((ray / "run.json").read_text())["population"] == [0, 1]
    again = main([*grid, "--root", str(tmp_path / "ray"), "--backend", "ray", "--address", ray_cluster])
    assert again == 0  # everything finished: nothing to run


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_is_retried_and_resumes_exactly(tmp_path, ray_cluster):
    longer = [*TINY, "train.total_steps=200"]
    grid = ["--methods", "nashmtl", "--seeds", "0-1", "--config", "smoke", "--seeds-per-job", "2", *_sets(longer)]
    assert main([*grid, "--root", str(tmp_path / "straight")]) == 0
    cmd = [sys.executable, "-m", "rl_mtl.sweep", *grid, "--root", str(tmp_path / "killed"), "--backend", "ray",
           "--address", ray_cluster]  # fmt: skip
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "killed" / "smoke" / "nashmtl"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "seed1" / CHECKPOINT_NAME).exists():
        time.sleep(0.5)
    assert (run_dir / "seed1" / CHECKPOINT_NAME).exists(), "the job never reached its first checkpoint"
    log = run_dir / "seed0-1.log"
    (worker,) = re.findall(r"started by pid (\d+)", log.read_text())
    os.kill(int(worker), signal.SIGKILL)  # the Ray worker running the job; its training process dies with it
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out
    assert len(re.findall(r"started by pid (\d+)", log.read_text())) == 2, "the job was not retried"
    for seed in (0, 1):
        straight = _comparable(tmp_path / "straight" / "smoke" / "nashmtl" / f"seed{seed}")
        assert _comparable(run_dir / f"seed{seed}") == straight
        assert straight[-1]["step"] == 200


def test_the_ray_backend_says_how_to_install_ray_when_it_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    args = ["--methods", "ls", "--seeds", "0", "--config", "smoke", "--root", str(tmp_path), "--backend", "ray"]
    assert main(args) == 2
    assert "--backend ray needs Ray: pip install -c constraints.txt -e '.[ray]'" in capsys.readouterr().err


def test_a_root_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--methods", "ls", "--seeds", "0", "--config", "smoke", "--root", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
