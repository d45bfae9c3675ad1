"""scripts/gpu_check.sh without a GPU (its dry run: the install of carried wheels and the import
checks, as CI can run them) and the speed goals' verdicts it ends with."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rl_mtl.bench.__main__ import main as bench_main
from rl_mtl.bench.goals import verdicts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (a stand-in for a carried one)."""
    files = {
        "gpu_check_probe/__init__.py": b"VALUE = 1\n",
        "gpu_check_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
        "gpu_check_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("gpu_check_probe-0.1.dist-info/RECORD,,")
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("gpu_check_probe-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _script(*args, wheels: Path, env_extra=None):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(wheels), **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_the_dry_run_installs_carried_wheels_checks_imports_and_measures_nothing(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels)
    results = tmp_path / "results"
    out = _script("--dry-run", str(results), wheels=wheels)
    assert out.returncode == 0, out.stderr
    assert "installed 1 wheels" in out.stdout and "imports ok" in out.stdout
    assert "dry run (--dry-run): install and imports checked; no tests run, nothing measured" in out.stdout
    environment = json.loads((results / "environment.json").read_text())
    assert environment["torch"] == torch.__version__ and environment["cuda_available"] == torch.cuda.is_available()
    assert not list(results.glob("*.log"))  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_the_check_says_so_and_exits_cleanly(tmp_path):
    out = _script(str(tmp_path / "results"), wheels=tmp_path / "none")
    assert out.returncode == 0, out.stderr
    assert "no wheels in" in out.stdout
    assert "dry run (no CUDA device (torch.cuda.is_available() is False))" in out.stdout


def test_bad_usage_and_a_failing_import_are_explained(tmp_path):
    out = _script("--fast", wheels=tmp_path / "none")
    assert out.returncode == 1 and "unknown option --fast (usage: scripts/gpu_check.sh" in out.stderr
    # a package the machine lacks: the message names the fix
    blocker = tmp_path / "block"
    (blocker / "metaworld").mkdir(parents=True)
    (blocker / "metaworld" / "__init__.py").write_text("raise ImportError('metaworld is not installed')\n")
    out = _script("--dry-run", str(tmp_path / "r"), wheels=tmp_path / "none", env_extra={"PYTHONPATH": str(blocker)})
    assert out.returncode == 1 and "metaworld is not installed" in out.stderr
    assert "carry the missing package as a wheel (scripts/gpu_check.sh --download-wheels)" in out.stderr


def _result(seeds, rows):
    methods = [{"method": m, "compile": mode, "update_ms": ms, "update_over_ls": ratio,
                "train_over_env_only": share, "train_steps_per_s": 100.0, "protocol_hours_10_seeds": hours}
               for m, mode, ms, ratio, share, hours in rows]  # fmt: skip
    return {"device": "cuda", "seeds": seeds, "methods": methods}


def test_the_goals_are_judged_on_nash_mtls_fastest_mode():
    results = [
        _result(10, [("ls", "off", 10.0, 1.0, 0.5, 20.0), ("nashmtl", "off", 30.0, 3.0, 0.2, 40.0),
                     ("ls", "graphs", 2.0, 1.0, 0.9, 4.0), ("nashmtl", "graphs", 2.4, 1.2, 0.8, 5.0)]),
        _result(1, [("nashmtl", "graphs", 1.5, None, 0.75, 30.0)]),
    ]  # fmt: skip
    lines = verdicts(results)
    assert lines[0].startswith("PASS  Nash-MTL update <= 1.3x ls update: 1.20x (2.40 ms; S=10, compile=graphs")
    assert lines[1].startswith("PASS  Nash-MTL training >= 70% of env-only throughput: 80%")
    assert lines[2].startswith("PASS  10 seeds x 2M MT10 steps < 12 h: 5.0 h, within the aim")
    slow = [_result(10, [("ls", "whole", 5.0, 1.0, 0.6, 10.0), ("nashmtl", "whole", 9.0, 1.8, 0.4, 13.0)])]
    assert [line.split()[0] for line in verdicts(slow)] == ["FAIL", "FAIL", "FAIL"]
    assert verdicts([_result(1, [("ls", "off", 1.0, 1.0, 0.5, 3.0)])])[0].startswith("NOT MEASURED")


def test_goals_refuses_a_file_that_is_not_a_bench_result(tmp_path, capsys):
    foreign = tmp_path / "x.json"
    foreign.write_text('{"weights": []}')
    assert bench_main(["goals", str(foreign)]) == 2
    assert "not a bench train result (no 'methods' list)" in capsys.readouterr().err
