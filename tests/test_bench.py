"""The benchmark commands run (quick mode) and report the numbers they promise."""

import json

import pytest

from rl_mtl.bench.__main__ import main


def test_aggregator_benchmark_quick_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["aggregators", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["K"] for row in result["weights"]] == [2, 10]
    for row in result["weights"]:
        assert set(row["ms"]) >= {"ls", "nashmtl", "fairgrad", "pcgrad", "cagrad", "mgda", "imtlg", "nashmtl (cvxpy)"}
        assert row["nashmtl_max_rel_diff"] < 1e-4
    assert result["task_gradients"]["vmap_over_mean"] > 0
    # train --seeds: one vmapped solve for all seeds dispatches fewer kernels than a call per seed
    seeds = {row["method"]: row for row in result["seed_aggregation"]}
    assert set(seeds) == {"nashmtl", "fairgrad", "pcgrad", "cagrad", "mgda", "imtlg"}
    for row in seeds.values():
        assert 0 < row["kernels"]["together"] < row["kernels"]["per seed"], row
        assert set(row["ms"]) == {"per seed", "together", "cpu path"}
    printed = capsys.readouterr().out
    assert "vmapped / mean-loss" in printed and "one vmapped solve" in printed


def test_training_benchmark_quick_mode_reports_ratios(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--quick", "--device", "cpu", "--methods", "ls", "nashmtl", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env_only_steps_per_s"] > 0
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["ls"]["update_over_ls"] == 1.0 and rows["nashmtl"]["update_over_ls"] > 0
    assert rows["nashmtl"]["train_over_env_only"] > 0
    # the kernels an update dispatches on the GPU path: Nash-MTL's two solves come on top of ls's work
    assert rows["nashmtl"]["kernels_per_update"] > rows["ls"]["kernels_per_update"] > 0
    assert (
        rows["nashmtl"]["kernels_over_ls"] == rows["nashmtl"]["kernels_per_update"] / rows["ls"]["kernels_per_update"]
    )
    assert "env-only (random actions)" in capsys.readouterr().out


def test_training_benchmark_measures_seeds_trained_together_in_each_compile_mode(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = ["train", "--quick", "--device", "cpu", "--methods", "ls", "--seeds", "2", "--compile", "off", "whole"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["seeds"] == 2 and result["compile_modes"] == ["off", "whole"]
    eager, whole = result["methods"]
    assert (eager["method"], eager["compile"], whole["method"], whole["compile"]) == ("ls", "off", "ls", "whole")
    assert eager["update_over_ls"] == whole["update_over_ls"] == 1.0  # each against ls of its own mode
    assert eager["update_over_eager"] is None
    assert whole["update_over_eager"] == pytest.approx(whole["update_ms"] / eager["update_ms"])
    # counted as each mode runs: the compiled graph fuses the eager update's operator calls
    assert 0 < whole["kernels_per_update"] < eager["kernels_per_update"] / 2
    # 10 seeds in 5 batches of 2: 5 x 2M steps at the measured batched throughput
    for row in result["methods"]:
        assert row["protocol_hours_10_seeds"] == pytest.approx(5 * 2e6 / row["train_steps_per_s"] / 3600)
    printed = capsys.readouterr().out
    assert "5 batch(es) of 2" in printed and "ls (whole)" in printed
