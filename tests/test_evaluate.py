"""Evaluator statistics against hand computations, bad inputs, and the plot/sweep commands."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import trim_mean

from rl_mtl.config import Config, parse_seeds
from rl_mtl.evaluate import main as evaluate_main
from rl_mtl.plot import main as plot_main
from rl_mtl.stats import iqm, mean_sem, stratified_bootstrap_ci

TASKS = ["reach-v3", "push-v3"]


def make_run(root: Path, method: str, seed: int, evals: list[tuple[int, list[float]]], **config_changes) -> Path:
    """A synthetic run directory with the given evaluations (step, per-task success)."""
    run_dir = root / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    config = Config().to_dict() | {"method": method, "seed": seed}
    for key, value in config_changes.items():
        section, field = key.split("__")
        config[section][field] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 10, "kind": "train", "loss/critic_mean": 1.0}]
    for step, success in evals:
        record = {"step": step, "kind": "eval", "eval/episodes_per_task": 50.0}
        record.update({f"eval/success/{t}": s for t, s in zip(TASKS, success, strict=True)})
        record["eval/success_mean"] = float(np.mean(success))
        lines.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


# final and best scores per seed for method "a" (tasks reach, push)
A_EVALS = {
    0: [(100, [0.2, 0.4]), (200, [0.9, 0.5]), (300, [0.6, 0.6])],  # best at 200 (mean 0.7), final (0.6, 0.6)
    1: [(100, [0.1, 0.1]), (200, [0.3, 0.2]), (300, [0.8, 0.4])],  # best = final
    2: [(100, [1.0, 1.0]), (200, [0.5, 0.5]), (300, [0.7, 0.3])],  # best at 100
}


def _json_report(paths, capsys):
    assert evaluate_main([*map(str, paths), "--format", "json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_mean_sem_iqm_and_best_match_hand_computations(tmp_path, capsys):
    for seed, evals in A_EVALS.items():
        make_run(tmp_path, "a", seed, evals)
    report, _ = _json_report([tmp_path], capsys)
    (group,) = report["groups"]
    final = np.array([[0.6, 0.6], [0.8, 0.4], [0.7, 0.3]])
    best = np.array([[0.9, 0.5], [0.8, 0.4], [1.0, 1.0]])
    reach = group["tasks"][0]
    assert math.isclose(reach["final_mean"], 0.7)
    assert math.isclose(reach["final_sem"], np.std([0.6, 0.8, 0.7], ddof=1) / math.sqrt(3))
    assert math.isclose(reach["best_mean"], 0.9)
    mean = group["mean"]
    per_seed_final = final.mean(axis=1)  # 0.6, 0.6, 0.5
    assert math.isclose(mean["final_mean"], per_seed_final.mean())
    assert math.isclose(mean["final_sem"], per_seed_final.std(ddof=1) / math.sqrt(3))
    assert math.isclose(mean["best_mean"], best.mean(axis=1).mean())
    # IQM of the 6 (seed, task) scores: sorted .3 .4 .6 .6 .7 .8; scipy cuts int(0.25*6)=1 each end
    assert math.isclose(mean["iqm"], np.mean([0.4, 0.6, 0.6, 0.7]))
    assert mean["iqm_ci"][0] <= mean["iqm"] <= mean["iqm_ci"][1]
    assert mean["worst_task"] == "push-v3"


def test_table_says_what_it_computed_and_sem_is_na_for_one_seed(tmp_path, capsys):
    make_run(tmp_path, "solo", 0, [(100, [0.5, 0.25])])
    assert evaluate_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.500 ± n/a" in out and "ddof=1" in out and "stratified bootstrap" in out
    report, _ = _json_report([tmp_path], capsys)
    assert report["groups"][0]["mean"]["final_sem"] is None


def test_summary_has_one_row_per_method_in_every_format(tmp_path, capsys):
    for seed, evals in A_EVALS.items():
        make_run(tmp_path, "a", seed, evals)
        make_run(tmp_path, "b", seed, [(300, [0.1 * seed, 0.2])])
    for fmt, marker in (("markdown", "| a | 0.567 ± "), ("csv", "Summary"), ("latex", "\\pm"), ("table", "Summary")):
        assert evaluate_main([str(tmp_path), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert marker in out, fmt
    out_file = tmp_path / "report.md"
    assert evaluate_main([str(tmp_path / "*"), "--format", "markdown", "--out", str(out_file)]) == 0
    assert "| b |" in out_file.read_text()


def test_bad_inputs_give_clear_messages_and_readable_data_is_used(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err
    make_run(tmp_path / "r", "a", 0, [])
    assert evaluate_main([str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no evaluation yet" in err and "none of the runs has an evaluation" in err
    killed = make_run(tmp_path / "r", "a", 1, [(100, [0.5, 0.5])])
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 200, "kind": "ev')
    make_run(tmp_path / "r", "a", 2, [(100, [0.5, 0.5])], train__batch_size_per_task=64)
    report, err = _json_report([tmp_path / "r"], capsys)
    assert "1 unreadable line(s)" in err
    assert "use 2 different configs (differing keys: train.batch_size_per_task)" in err
    assert sorted(g["label"] for g in report["groups"]) == ["a [config 1]", "a [config 2]"]


def test_the_label_names_the_network_where_it_is_not_the_shared_one(tmp_path, capsys):
    make_run(tmp_path / "shared", "ls", 0, [(100, [0.5, 0.5])])
    make_run(tmp_path / "care", "ls", 0, [(100, [0.7, 0.5])], agent__architecture="care")
    make_run(tmp_path / "moore", "ls", 0, [(100, [0.6, 0.5])], agent__architecture="moore")
    report, err = _json_report([tmp_path], capsys)
    assert sorted(g["label"] for g in report["groups"]) == ["ls", "ls (care)", "ls (moore)"]
    assert "different configs" not in err  # each network is its own group, named, not "config i"


def test_stratified_bootstrap_interval_covers_the_true_iqm_about_95_percent():
    rng = np.random.default_rng(0)
    true_iqm = trim_mean(rng.beta(2, 5, size=2_000_000), 0.25)  # population IQM of Beta(2, 5)
    trials, covered = 200, 0
    for t in range(trials):
        scores = rng.beta(2, 5, size=(10, 10))
        low, high = stratified_bootstrap_ci(scores, reps=500, seed=t)
        covered += low <= true_iqm <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_stats_helpers():
    assert mean_sem(np.array([1.0, 2.0, 3.0])) == (2.0, 1.0 / math.sqrt(3))
    assert mean_sem(np.array([4.0]))[1] is None
    assert iqm(np.array([0.0, 1.0, 2.0, 3.0, 100.0, -100.0, 1.5, 2.5])) == pytest.approx(1.75)
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]


def test_plot_writes_pngs_with_curves(tmp_path, capsys):
    for seed, evals in A_EVALS.items():
        make_run(tmp_path / "runs", "a", seed, evals)
    assert plot_main([str(tmp_path / "runs"), "--out", str(tmp_path / "plots")]) == 0
    for name in ("mt_success.png", "mt_success_per_task.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_sweep_evaluate_and_plot_on_real_smoke_runs(tmp_path):
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "rl_mtl.sweep", "--methods", "ls", "pcgrad", "--seeds", "0-1", "--config", "smoke"]
    cmd += ["--jobs", "2", "--root", str(root), "--set", "train.total_steps=200", "--set", "train.eval_every=100"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 runs in 4 job(s) to run" in first.stdout and "Summary" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs in 0 job(s) to run, 4 finished earlier" in again.stdout
    assert evaluate_main([str(root / "smoke"), "--format", "json", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(g["label"] for g in report["groups"]) == ["ls", "pcgrad"]
    assert all(g["seeds"] == [0, 1] for g in report["groups"])
    assert plot_main([str(root / "smoke"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "mt_success_per_task.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_checkpoint_reevaluation_reproduces_the_runs_own_final_evaluation(tmp_path, capsys):
    from rl_mtl.checkpoint import CHECKPOINT_NAME
    from rl_mtl.config import load_config
    from rl_mtl.metrics import read_metrics
    from rl_mtl.train import run

    overrides = ["train.total_steps=100", "train.warmup_steps=50", "train.eval_every=0", "train.eval_episodes=2"]
    assert run([(load_config("smoke", overrides, method="ls"), tmp_path / "run", None)], progress=False) == 0
    (final_eval,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")[0] if r["kind"] == "eval"]
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    assert (
        evaluate_main(["--checkpoint", str(checkpoint), "--episodes", "2", "--format", "json", "--device", "cpu"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 100 and len(result["success"]) == 10
    # the same policy, the same fresh evaluation env and goals: the same numbers
    for task, success in result["success"].items():
        assert success == final_eval[f"eval/success/{task}"]
        assert result["return"][task] == pytest.approx(final_eval[f"eval/return/{task}"])
    assert evaluate_main(["--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_options_of_other_methods_do_not_split_a_group(tmp_path, capsys):
    make_run(tmp_path, "a", 0, [(100, [0.5, 0.5])])
    other = make_run(tmp_path, "a", 1, [(100, [0.7, 0.3])])
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["method_options"]["cagrad"] = {"c": 0.1}  # not method "a"'s options: never read by the run
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    report, err = _json_report([tmp_path], capsys)
    assert [g["seeds"] for g in report["groups"]] == [[0, 1]] and "different configs" not in err


def test_speed_switches_do_not_split_a_group_but_algorithm_settings_do(tmp_path, capsys):
    make_run(tmp_path, "a", 0, [(100, [0.5, 0.5])])
    make_run(tmp_path, "a", 1, [(100, [0.7, 0.3])], train__compile=True)  # same algorithm, compiled
    report, err = _json_report([tmp_path], capsys)
    assert [g["seeds"] for g in report["groups"]] == [[0, 1]] and "different configs" not in err
    make_run(tmp_path, "a", 2, [(100, [0.7, 0.3])], train__batch_size_per_task=64)
    report, _ = _json_report([tmp_path], capsys)
    assert sorted(g["seeds"] for g in report["groups"]) == [[0, 1], [2]]


def test_a_method_with_a_main_task_reports_it_first(tmp_path, capsys):
    for seed, success in ((0, [0.2, 0.9]), (1, [0.4, 0.7])):
        run_dir = make_run(tmp_path, "auxinash", seed, [(100, success)])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["method_options"]["auxinash"] = {"main_task": "push-v3"}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    report, _ = _json_report([tmp_path], capsys)
    (group,) = report["groups"]
    assert group["main_task"]["task"] == "push-v3" and group["main_task"]["final_mean"] == pytest.approx(0.8)
    assert group["tasks"][0]["task"] == "push-v3 (main task)"
    assert evaluate_main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.index("push-v3 (main task)") < table.index("reach-v3")
    assert "auxinash (main task push-v3: final 0.800 ± 0.100)" in table
