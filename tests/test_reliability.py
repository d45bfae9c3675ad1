"""Faults a user or the machine can cause: each ends with one clear line and a non-zero exit, and
nothing is lost. Checkpoints can run no code, are checked for integrity and identity, have one
writer, and a population's checkpoints always resume together."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import rl_mtl.checkpoint as checkpoint_module
from rl_mtl.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, load_checkpoint, save_checkpoint
from rl_mtl.config import load_config
from rl_mtl.evaluate import main as evaluate_main
from rl_mtl.metrics import read_metrics
from rl_mtl.sweep import main as sweep_main
from rl_mtl.train import EXIT_INTERRUPTED, main, run

# two tasks, 50-step episodes, 100 steps with a checkpoint at 50 and 100: a run of a few seconds
TINY = ["env.benchmark=custom", "env.tasks=[reach-v3, window-close-v3]", "train.total_steps=100",
        "train.warmup_steps=50", "train.checkpoint_every=50", "train.eval_every=0", "train.eval_episodes=1",
        "train.log_every=25"]  # fmt: skip


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


def _train(run_dir, *extra, method="ls", seed=0, overrides=TINY):
    return main(["--config", "smoke", "--method", method, "--seed", str(seed), "--run-dir", str(run_dir),
                 "--no-progress", *_sets(overrides), *extra])  # fmt: skip


def _resume(*run_dirs, extra=()):
    return main(["--resume", *map(str, run_dirs), "--no-progress", *extra])


def _comparable(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


class _RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- the checkpoint file: no code, integrity, identity ------------------------------------------------
@pytest.mark.slow
def test_a_crafted_checkpoint_runs_no_code_in_any_command_that_reads_checkpoints(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "runs" / "smoke" / "ls" / "seed0"
    assert _train(run_dir) == 0
    # 1. a pickle where the checkpoint was (rl-mtl's old format): never opened
    (run_dir / CHECKPOINT_NAME).unlink()
    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"step": 1, "x": _RunsCode(marker)}))
    assert _resume(run_dir, extra=["--set", "train.total_steps=150"]) == 2
    assert "format 1" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint.pt")]) == 2
    assert "is a pickle" in capsys.readouterr().err
    sweep = ["--methods", "ls", "--seeds", "0", "--config", "smoke", "--root", str(tmp_path / "runs"), *_sets(TINY)]
    assert sweep_main(sweep) == 2
    assert "format 1" in capsys.readouterr().err
    # 2. a valid file whose saved goals carry a pickle: Meta-World never gets to unpickle it
    (run_dir / "checkpoint.pt").unlink()
    assert _train(tmp_path / "other") == 0
    state = load_checkpoint(tmp_path / "other" / CHECKPOINT_NAME)
    state["env"][0]["tasks"][0]["data"] = pickle.dumps(_RunsCode(marker)).hex()
    save_checkpoint(tmp_path / "other" / CHECKPOINT_NAME, state)
    assert _resume(tmp_path / "other", extra=["--set", "train.total_steps=150"]) == 2
    assert "does not fit this run" in capsys.readouterr().err
    assert not marker.exists(), "reading a checkpoint ran code"


def test_a_checkpoint_whose_header_length_starts_like_a_pickle_still_opens(tmp_path):
    """A safetensors file begins with its header's length: one of 128 + 256 n bytes begins with
    0x80, a pickle's first byte. The sniffing must not take it for one."""
    path = tmp_path / CHECKPOINT_NAME
    for pad in range(300):
        save_checkpoint(path, {"step": 1, "note": "x" * pad, "w": torch.ones(2)})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 + 256 n bytes")
    assert load_checkpoint(path)["note"] == "x" * pad
    assert checkpoint_module.is_pickle(pickle.dumps({"step": 1}, protocol=4))
    assert checkpoint_module.is_pickle(b"PK\x03\x04rest")


@pytest.mark.slow
def test_another_runs_checkpoint_is_refused_naming_the_field(tmp_path, capsys):
    runs = {
        "mine": (0, "ls", []),
        "seed": (1, "ls", []),
        "method": (0, "pcgrad", []),
        "tau": (0, "ls", ["agent.tau=0.01"]),
    }
    for name, (seed, method, extra) in runs.items():
        assert _train(tmp_path / name, method=method, seed=seed, overrides=[*TINY, *extra]) == 0
    mine = tmp_path / "mine" / CHECKPOINT_NAME
    original = mine.read_bytes()
    expected = {"seed": "its seed is 1, this run directory's is 0", "method": "its method is 'pcgrad'",
                "tau": "its config differs from .* in agent.tau"}  # fmt: skip
    for name, message in expected.items():
        mine.write_bytes((tmp_path / name / CHECKPOINT_NAME).read_bytes())
        assert _resume(tmp_path / "mine", extra=["--set", "train.total_steps=150"]) == 2
        err = capsys.readouterr().err
        assert "belongs to another run" in err and __import__("re").search(message, err), err
    assert (tmp_path / "mine" / "metrics.jsonl").read_text().count("\n") > 0, "the refused resume truncated the log"
    mine.write_bytes(original)
    assert _resume(tmp_path / "mine", extra=["--set", "train.total_steps=150"]) == 0


@pytest.mark.slow
def test_a_flipped_byte_in_tensor_data_is_detected(tmp_path, capsys):
    assert _train(tmp_path / "run") == 0
    path = tmp_path / "run" / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x10  # inside the last tensors' bytes (the replay)
    path.write_bytes(bytes(data))
    assert _resume(tmp_path / "run", extra=["--set", "train.total_steps=150"]) == 2
    assert "failed its integrity check" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(path)]) == 2
    assert "failed its integrity check" in capsys.readouterr().err


def test_files_that_are_not_checkpoints_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    from rl_mtl.run_dir import CheckpointError

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))  # a safetensors file, not ours
    with pytest.raises(CheckpointError, match="not an rl-mtl checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path / "dir.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


# -- one writer per run directory --------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_one_does_not_block_its_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl_mtl.train", "--config", "smoke", "--method", "ls", "--run-dir", str(run_dir),
           "--no-progress", *_sets([*TINY, "train.total_steps=100000", "train.checkpoint_every=50"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / CHECKPOINT_NAME).exists():
            time.sleep(0.5)
        assert (run_dir / CHECKPOINT_NAME).exists()
        assert _resume(run_dir) == 2
        assert f"is being written by pid {proc.pid}" in capsys.readouterr().err
        assert _train(run_dir) == 2  # a new run into it is refused too
        capsys.readouterr()
        assert evaluate_main([str(run_dir), "--format", "json"]) in (0, 2)  # reading needs no lock
        assert "is being written" not in capsys.readouterr().err
    finally:
        proc.kill()  # kill -9: the kernel releases its lock
        proc.wait()
    assert _resume(run_dir, extra=["--set", "train.total_steps=200"]) == 0


# -- a population's checkpoints are one set ------------------------------------------------------------
@pytest.mark.slow
def test_a_population_killed_between_two_seeds_writes_resumes_together_exactly(tmp_path, monkeypatch):
    overrides = [*TINY, "train.total_steps=150"]
    cfgs = [load_config("smoke", overrides, method="pcgrad", seed=s) for s in (0, 1)]
    assert run([(cfg, tmp_path / "straight" / f"seed{cfg.seed}", None) for cfg in cfgs], progress=False) == 0

    class Killed(BaseException):
        pass

    original, calls = checkpoint_module.save_checkpoint, []

    def dies_after_the_first_seed_of_step_100(path, state):
        if state["step"] == 100 and calls:
            raise Killed  # seed 1 of step 100, after seed 0 wrote its checkpoint (and seed 1 renamed its own)
        calls.append(state["step"]) if state["step"] == 100 else None
        original(path, state)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", dies_after_the_first_seed_of_step_100)
    killed = [tmp_path / "killed" / f"seed{s}" for s in (0, 1)]
    with pytest.raises(Killed):
        run([(cfg, d, None) for cfg, d in zip(cfgs, killed, strict=True)], progress=False)
    monkeypatch.undo()
    assert checkpoint_module.read_step(killed[0] / CHECKPOINT_NAME) == 100
    assert not (killed[1] / CHECKPOINT_NAME).exists() and checkpoint_module.read_step(killed[1] / PREVIOUS_NAME) == 50
    assert _resume(*killed) == 0  # both continue from step 50, the step they both have
    for seed in (0, 1):
        assert _comparable(tmp_path / "straight" / f"seed{seed}") == _comparable(killed[seed])
        assert not (killed[seed] / PREVIOUS_NAME).exists()


# -- config numbers --------------------------------------------------------------------------------------
def test_numbers_are_read_as_users_write_them():
    cfg = load_config("smoke", ["agent.critic_lr=1e-4", "agent.actor_lr=3E-4", "method_options.cagrad.c=5e-1"])
    assert cfg.agent.critic_lr == 1e-4 and cfg.agent.actor_lr == 3e-4 and cfg.method_options["cagrad"]["c"] == 0.5


def test_a_negative_seed_on_the_command_line_is_explained(capsys):
    assert main(["--config", "smoke", "--seed", "-1", "--print-config"]) == 2
    assert "seed must be in [0, 4294967295]" in capsys.readouterr().err


def test_metaworld_truncates_episodes_where_the_config_says():
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    from rl_mtl.config import MAX_EPISODE_STEPS

    assert SawyerXYZEnv.max_path_length == MAX_EPISODE_STEPS


@pytest.mark.slow
def test_the_advice_after_a_divergence_works_as_written(tmp_path, capsys):
    """Learning rates far too large blow the networks up; the run stops at the checkpoint after
    the streak, and the command its message gives (smaller learning rates) resumes it."""
    huge = ["agent.critic_lr=1e30", "agent.actor_lr=1e30", "train.max_nonfinite_updates=5", "train.total_steps=150"]
    assert _train(tmp_path / "run", overrides=[*TINY, *huge]) == 2
    err = capsys.readouterr().err
    assert "consecutive updates had non-finite losses" in err
    command = err.split("resume from it with smaller learning rates, ")[1].split(", or start again")[0].split()
    assert command[:3] == ["python", "-m", "rl_mtl.train"]
    assert main([*command[3:], "--no-progress"]) == 0
    (resumed,) = (tmp_path / "run").glob("run.resumed-*.json")
    changed = json.loads(resumed.read_text())["changed_on_resume"]
    assert changed == {"agent.critic_lr": [1e30, 1e-4], "agent.actor_lr": [1e30, 1e-4]}
    assert "resuming with agent.critic_lr changed from 1e+30 to 0.0001" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 150


# -- faults: one clear line, a non-zero exit, nothing lost ----------------------------------------------
@pytest.mark.slow
def test_a_full_disk_while_saving_is_explained_and_the_last_checkpoint_resumes(tmp_path, capsys, monkeypatch):
    original = checkpoint_module.save_checkpoint

    def disk_full_at_step_100(path, state):
        if state["step"] == 100:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, state)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", disk_full_at_step_100)
    assert _train(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "the disk is full: could not write" in err and "Traceback" not in err
    monkeypatch.undo()
    assert _resume(tmp_path / "run") == 0  # from the checkpoint of step 50, kept aside while step 100 was written
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 100


def test_a_read_only_run_directory_is_explained(tmp_path, capsys, monkeypatch):
    import rl_mtl.run_dir as run_dir_module

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(run_dir_module.os, "open", read_only)
    assert _train(tmp_path / "run") == 2
    assert "cannot create or write" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    monkeypatch.undo()
    assert _train(tmp_path / "file") == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_broken_config_files_are_explained(tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe binary")
    assert main(["--config", str(tmp_path / "binary.yaml"), "--print-config"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    for name, text in (("scalar", "3\n"), ("broken", "train: [1, 2\n")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(text)
        assert _resume(run_dir) == 2
        err = capsys.readouterr().err
        assert "must hold a mapping" in err or "is not valid YAML" in err
        assert evaluate_main([str(run_dir)]) == 2
        assert "this run directory cannot be read" in capsys.readouterr().err


def test_a_replay_too_large_for_memory_is_explained():
    from rl_mtl.buffers import ReplayBuffer, ReplayError

    with pytest.raises(ReplayError, match=r"the replay needs .* GiB .* lower train.buffer_capacity_per_task"):
        ReplayBuffer([0, 1], 10, 10**10, 49, 4, torch.device("cpu"))


@pytest.mark.slow
def test_a_killed_env_worker_is_explained(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl_mtl.train", "--config", "smoke", "--method", "ls", "--run-dir", str(run_dir),
           "--no-progress", *_sets([*TINY, "env.vector_strategy=async", "train.total_steps=100000"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no env worker processes found"
    os.kill(int(workers[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "an environment worker process died" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = load_config("smoke", TINY, method="ls")
    assert run([(cfg, run_dir, None)], progress=False, stop_at_step=20) == EXIT_INTERRUPTED  # before step 50
    (run_dir / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    assert _train(run_dir) == 2
    assert "never reached its first checkpoint; start it again with --resume" in capsys.readouterr().err
    assert _resume(run_dir) == 0
    assert "starting it again from step 0" in capsys.readouterr().err
    assert not list(run_dir.glob(".*.tmp")), "the dead write's temporary file is left"
    (aside,) = run_dir.glob("aborted-*")
    assert (aside / "metrics.jsonl").is_file()
    assert _comparable(run_dir)[0]["step"] == 25 and load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 100


@pytest.mark.slow
def test_a_finished_run_resumed_beside_a_stranger_without_checkpoints_is_not_restarted(tmp_path, capsys):
    """Only seeds trained together can lack checkpoints because their first set was cut short;
    a run with checkpoints resumed beside a separate run without any must not start again."""
    done, fresh = tmp_path / "done", tmp_path / "fresh"
    assert _train(done) == 0
    cfg = load_config("smoke", TINY, method="ls", seed=1)
    assert run([(cfg, fresh, None)], progress=False, stop_at_step=20) == EXIT_INTERRUPTED  # before step 50
    before = (done / "metrics.jsonl").read_bytes()
    assert _resume(done, fresh, extra=("--set", "train.total_steps=150")) == 2
    assert "were not trained together; resume them in separate commands" in capsys.readouterr().err
    assert (done / "metrics.jsonl").read_bytes() == before and not list(done.glob("aborted-*"))
    assert load_checkpoint(done / CHECKPOINT_NAME)["step"] == 100


@pytest.mark.slow
def test_sigterm_during_start_up_says_what_happened(tmp_path):
    cmd = [sys.executable, "-m", "rl_mtl.train", "--config", "smoke", "--run-dir", str(tmp_path / "run"),
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # printed once the run is resolved, before its envs are built
    assert first.startswith("run directory:"), first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "SIGTERM: stopped during start-up, before training; no checkpoint was written" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()
