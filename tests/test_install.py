"""A wheel (what ``pip install .`` installs too) has everything it needs: its presets live in the
package."""

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_trains_from_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The dependencies come from this environment (a .pth line adds its site-packages, without
    # running its own .pth files, so its editable rl_mtl stays out); rl_mtl itself is installed.
    packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    outer = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(packages) / "outer.pth").write_text("\n".join(sorted(outer)) + "\n")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", str(ROOT)]
    result = subprocess.run(build, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("rl_mtl-*.whl")
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True,
                            text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import rl_mtl; print(rl_mtl.__file__)"], capture_output=True,
                           text=True, cwd=elsewhere, check=True).stdout  # fmt: skip
    assert where.startswith(packages), f"imported {where}, not the installed copy"
    cmd = [str(python), "-m", "rl_mtl.train", "--config", "smoke", "--method", "ls", "--run-dir", "run",
           "--no-progress", "--set", "train.total_steps=100", "--set", "train.warmup_steps=50"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=elsewhere, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((elsewhere / "run" / "run.json").read_text())["method"] == "ls"
    assert (elsewhere / "run" / "checkpoint.safetensors").is_file()
