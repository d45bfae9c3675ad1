"""End-to-end training: smoke runs of every method, exact resume, and the bad-input paths."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl_mtl import __version__
from rl_mtl.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rl_mtl.config import load_config
from rl_mtl.metrics import read_metrics
from rl_mtl.registry import METHODS
from rl_mtl.train import EXIT_INTERRUPTED, main, run, train_loop
from rl_mtl.training import Training

SMOKE = ["--config", "smoke", "--no-progress"]
TASK = "reach-v3"
REQUIRED_TRAIN = [
    f"loss/critic/{TASK}", f"loss/actor/{TASK}", f"temperature/{TASK}", f"weights/critic/{TASK}",
    f"weights/actor/{TASK}", "grad/min_cosine_critic", "grad/min_cosine_actor", "aggregator/fallbacks_critic",
    "aggregator/fallbacks_actor", "perf/steps_per_second",
]  # fmt: skip
REQUIRED_EPISODE = [f"episode/return/{TASK}", f"episode/success/{TASK}", "episode/return_mean", "episode/success_mean"]
REQUIRED_EVAL = [f"eval/success/{TASK}", "eval/success_mean"]


def _tensorboard_tags(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _comparable(run_dir: Path) -> list[dict]:
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_smoke_training_of_every_method_leaves_a_complete_run_directory(tmp_path, method):
    run_dir = tmp_path / method
    main_task = ["--set", "method_options.auxinash.main_task=reach-v3"]  # what AuxiNash requires
    short = ["--set", "train.total_steps=200", "--set", "train.eval_every=100"]  # 100 updates: every code path
    assert main([*SMOKE, "--method", method, "--run-dir", str(run_dir), *main_task, *short]) == 0
    records, _ = read_metrics(run_dir / "metrics.jsonl")
    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in ("train", "episode", "eval")}
    for kind, keys in (("train", REQUIRED_TRAIN), ("episode", REQUIRED_EPISODE), ("eval", REQUIRED_EVAL)):
        last = by_kind[kind][-1]
        for key in keys:
            assert key in last and last[key] is not None and math.isfinite(last[key]), f"{kind} record lacks {key}"
    assert [r["step"] for r in by_kind["eval"]] == [100, 200]
    tags = _tensorboard_tags(run_dir)
    for key in REQUIRED_TRAIN + REQUIRED_EPISODE + REQUIRED_EVAL:
        assert key in tags and all(math.isfinite(v) for v in tags[key]), f"TensorBoard lacks {key}"
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert state["step"] == 200 and state["config"]["method"] == method and state["method"] == method
    assert {"agent", "agent_generator", "replay", "rng", "env", "eval_env", "warmup_rng"} <= set(state)
    assert {"critic", "actor"} == set(state["agent"]["aggregators"])
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "run.json").read_text())["seed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "overrides", "kill_at", "checkpoint"),
    [
        # pcgrad: its random task order must resume too; kill 130 steps after the checkpoint
        ("pcgrad", [], 330, 200),
        # async envs with the update overlapping the env step
        ("nashmtl", ["env.vector_strategy=async", "train.total_steps=200", "train.checkpoint_every=100"], 160, 100),
    ],
)
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, method, overrides, kill_at, checkpoint):
    cfg = load_config("smoke", overrides, method=method)
    assert run([(cfg, tmp_path / "straight", None)], progress=False) == 0
    # "kill -9": the last checkpoint is earlier, and metrics were logged after it
    assert run([(cfg, tmp_path / "killed", None)], progress=False, stop_at_step=kill_at) == EXIT_INTERRUPTED
    assert max(r["step"] for r in _comparable(tmp_path / "killed")) > checkpoint
    state = load_checkpoint(tmp_path / "killed" / CHECKPOINT_NAME)
    assert state["step"] == checkpoint
    assert run([(cfg, tmp_path / "killed", state)], progress=False) == 0
    assert _comparable(tmp_path / "straight") == _comparable(tmp_path / "killed")
    assert (
        _tensorboard_tags(tmp_path / "killed")["eval/success_mean"]
        == _tensorboard_tags(tmp_path / "straight")["eval/success_mean"]
    )


@pytest.mark.slow
def test_sigterm_saves_at_the_episode_boundary_and_resume_completes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl_mtl.train", *SMOKE, "--method", "ls", "--run-dir", str(run_dir)]
    cmd += ["--set", "train.total_steps=5000", "--set", "train.checkpoint_every=5000"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "checkpoint saved" in err
    step = load_checkpoint(run_dir / CHECKPOINT_NAME)["step"]
    assert step % 50 == 0 and 0 < step < 5000
    assert main(["--resume", str(run_dir), "--no-progress", "--set", "train.total_steps=600"]) == 0
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 600


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main([*SMOKE, "--run-dir", str(tmp_path)]) == 2
    assert "never reached its first checkpoint; start it again with --resume" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    from rl_mtl.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"step": 100})
    assert main([*SMOKE, "--run-dir", str(tmp_path)]) == 2
    assert "already holds a run; resume it with --resume" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_errors_are_clear(tmp_path, capsys):
    assert main(["--resume", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {total_steps: 400}\n")
    assert main(["--resume", str(run_dir), "--set", "agent.tau=0.1", "--no-progress"]) == 2
    assert "cannot resume" in (err := capsys.readouterr().err) and "agent.tau: saved 0.005, requested 0.1" in err
    assert not (tmp_path / "nope").exists(), "resuming a directory that is not a run created it"
    (run_dir / CHECKPOINT_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    assert main(["--resume", str(run_dir), "--no-progress"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["metric_sums", "rng"])  # one of each block load_states reads
def test_a_checkpoint_lacking_a_field_is_refused_naming_it(tmp_path, capsys, monkeypatch, field):
    """Fields read after the per-seed state (the counters, the process generators) gave a raw
    KeyError once; every one is refused as a checkpoint that does not fit, naming the field and
    the version that wrote it."""
    run_dir = tmp_path / "run"
    seed_state = Training.seed_state
    monkeypatch.setattr(Training, "seed_state", lambda self, s, *a: {
        k: v for k, v in seed_state(self, s, *a).items() if k != field})  # fmt: skip
    short = ["--set", "train.total_steps=100", "--set", "train.warmup_steps=50", "--set", "train.eval_every=0"]
    assert main([*SMOKE, "--method", "ls", "--run-dir", str(run_dir), *short]) == 0
    capsys.readouterr()
    monkeypatch.undo()
    assert main(["--resume", str(run_dir), "--set", "train.total_steps=200", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"lacks the field '{field}'" in err and "Traceback" not in err, err
    assert f"it was written by rl-mtl {__version__}, this is rl-mtl {__version__}" in err, err


def test_cuda_requested_without_cuda_is_explained(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*SMOKE, "--device", "cuda", "--run-dir", str(tmp_path / "r")]) == 2
    assert "CUDA was requested but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_unknown_method_exits_non_zero_with_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--method", "nash"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nash'" in capsys.readouterr().err


def test_print_config_prints_the_resolved_config(capsys):
    assert main(["--config", "smoke", "--method", "fairgrad", "--seed", "5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "method: fairgrad" in out and "seed: 5" in out and "total_steps: 400" in out


@pytest.mark.slow
def test_non_finite_losses_skip_updates_then_stop_without_poisoning(tmp_path, monkeypatch):
    from rl_mtl.envs import VectorEnvRunner

    original_step_wait = VectorEnvRunner.step_wait

    def poisoned_step_wait(self):
        next_obs, reward, terminated, truncated = original_step_wait(self)
        return next_obs, reward * float("nan"), terminated, truncated

    monkeypatch.setattr(VectorEnvRunner, "step_wait", poisoned_step_wait)
    # 50-step episodes: checkpoints due at steps 100 (end of the warm-up) and 150; logs at 200
    overrides = ["train.max_nonfinite_updates=5", "train.checkpoint_every=50", "train.log_every=100"]
    cfg = load_config("smoke", overrides, method="nashmtl")
    training = Training([(cfg, tmp_path, None)])
    before = [value.clone() for value in torch.utils._pytree.tree_leaves(training.population.state["actor"])]
    from rl_mtl.agents import NonFiniteLossError

    # the streak is read on the host when the run saves or logs: here the checkpoint due at 150
    with pytest.raises(
        NonFiniteLossError, match=r"50 consecutive updates had non-finite .*\(limit train\.max_nonfinite_updates=5"
    ):
        train_loop(training, progress=False)
    training.close()
    assert training.step == 150
    after = torch.utils._pytree.tree_leaves(training.population.state["actor"])
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "the networks changed"
    assert training.population.skip_counts() == [(50, 50, 50)]
    # the warm-up's checkpoint stays; none was written once the limit was passed
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 100


def test_truncated_metrics_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "eval"}\n{"step": 2, "ki')
    records, bad = read_metrics(path)
    assert [r["step"] for r in records] == [1] and bad == 1


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["multihead", "independent"])
def test_other_architectures_train(tmp_path, architecture):
    overrides = [f"agent.architecture={architecture}", "train.total_steps=200", "agent.temperature=shared"]
    cfg = load_config("smoke", overrides, method="cagrad")
    assert run([(cfg, tmp_path, None)], progress=False) == 0
    records, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert any(r["kind"] == "eval" for r in records)


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    overrides = ["env.benchmark=custom", "env.tasks=[reach-v3, drawer-close-v3, window-close-v3]",
                 "train.total_steps=200", "train.eval_every=100"]  # fmt: skip
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run([(load_config("smoke", overrides, method="cagrad", seed=seed), tmp_path / name, None)],
                   progress=False) == 0  # fmt: skip
    a, b, c = (_comparable(tmp_path / name) for name in "abc")
    assert a == b, "same seed, same config, same device must give the same numbers"
    assert a != c
    assert [r["step"] for r in a] == [r["step"] for r in c]


def test_overflowing_gradient_with_finite_losses_is_skipped_even_without_a_gramian(monkeypatch):
    """ls computes no Gramian; an update whose losses are finite but whose gradient overflowed
    must still be refused, leaving that seed's networks untouched (and the other seed's not)."""
    from rl_mtl.agents import SAC, Population
    from rl_mtl.buffers import Batch

    sac = SAC(5, 2, ["a", "b", "c"], load_config("smoke").agent, "ls")
    population = Population(sac, [0, 1], torch.device("cpu"))
    batch = Batch(torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4, 2), torch.ones(2, 3, 4), torch.randn(2, 3, 4, 5),
                  torch.zeros(2, 3, 4))  # fmt: skip
    assert population.update(batch)["applied"].all()

    exact = sac.critic_pass  # the per-task critic gradients, as the update calls them

    def overflowing(*args):
        losses, shared, task, *aux = exact(*args)
        name = next(iter(shared))
        shared[name] = shared[name].clone()
        shared[name][1] = float("inf")  # seed 1's gradient overflowed
        return losses, shared, task, *aux

    monkeypatch.setattr(sac, "critic_pass", overflowing)
    before = [t.clone() for t in torch.utils._pytree.tree_leaves(population.state["critic"])]
    assert population.update(batch)["applied"].tolist() == [True, False]
    assert [c[0] for c in population.skip_counts()] == [0, 1]
    after = torch.utils._pytree.tree_leaves(population.state["critic"])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(after, before, strict=True)), "the skipped seed changed"
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(after, before, strict=True))
