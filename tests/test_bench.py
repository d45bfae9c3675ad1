"""The benchmark commands run (quick mode) and report the numbers they promise."""

import json

from rl_mtl.bench import main


def test_aggregator_benchmark_quick_mode_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["aggregators", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["K"] for row in result["weights"]] == [2, 10]
    for row in result["weights"]:
        assert set(row["ms"]) >= {"ls", "nashmtl", "fairgrad", "pcgrad", "cagrad", "mgda", "imtlg", "nashmtl (cvxpy)"}
        assert row["nashmtl_max_rel_diff"] < 1e-4
    assert result["task_gradients"]["vmap_over_mean"] > 0
    assert "vmapped / mean-loss" in capsys.readouterr().out


def test_training_benchmark_quick_mode_reports_ratios(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--quick", "--device", "cpu", "--methods", "ls", "nashmtl", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env_only_steps_per_s"] > 0
    rows = {r["method"]: r for r in result["methods"]}
    assert rows["ls"]["update_over_ls"] == 1.0 and rows["nashmtl"]["update_over_ls"] > 0
    assert rows["nashmtl"]["train_over_env_only"] > 0
    assert "env-only (random actions)" in capsys.readouterr().out
