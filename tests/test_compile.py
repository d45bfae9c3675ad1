"""train.compile: the compiled update is the eager update (to float precision), and the switch's
automatic setting and its errors."""

import json
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from rl_mtl.agents import SAC, Population
from rl_mtl.buffers import Batch
from rl_mtl.config import ConfigError, load_config
from rl_mtl.metrics import read_metrics
from rl_mtl.runtime import resolve_compile
from rl_mtl.train import main

K, B, OBS, ACT = 4, 16, 7, 3
TASKS = [f"task{k}" for k in range(K)]


def _population(seeds, device, compile):
    return Population(SAC(OBS, ACT, TASKS, load_config("smoke").agent, "nashmtl", compile=compile), seeds, device)


def _batch(seeds, device, generator):
    def rand(*shape):
        return torch.randn(seeds, *shape, generator=generator).to(device)

    terminated = (torch.rand(seeds, K, B, generator=generator) < 0.1).float().to(device)
    return Batch(rand(K, B, OBS), rand(K, B, ACT).clamp(-1, 1), rand(K, B), rand(K, B, OBS), terminated)


def _assert_same_update(seeds, device):
    """Two updates of identically initialised populations, eager and compiled: same metrics and
    parameters to float precision (the compiled kernels may sum in another order)."""
    eager, compiled = _population(seeds, device, False), _population(seeds, device, True)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        batch = _batch(len(seeds), device, g)
        expected, got = eager.update(batch, True), compiled.update(batch, True)
        assert bool(got["applied"].all())
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    flat_eager = torch.utils._pytree.tree_flatten_with_path(eager.state)[0]
    flat_compiled = dict(torch.utils._pytree.tree_flatten_with_path(compiled.state)[0])
    for path, value in flat_eager:
        mine = flat_compiled[path]
        if value.is_floating_point():
            assert (mine - value).abs().max() / value.abs().max().clamp(min=1e-12) <= 1e-5, path
        else:
            assert torch.equal(mine, value), path


@pytest.mark.parametrize("seeds", [[0], [0, 1]], ids=["one seed", "two seeds"])
def test_the_compiled_update_is_the_eager_update(seeds):
    torch._dynamo.reset()  # compile afresh, so that the counters below see it happen
    counters.clear()
    _assert_same_update(seeds, torch.device("cpu"))
    # the three passes (TD target, critic, actor gradients) ran as compiled graphs, without breaks
    assert counters["stats"]["unique_graphs"] >= 3
    assert not counters["graph_break"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_update_is_the_eager_update_on_cuda():
    _assert_same_update([0, 1], torch.device("cuda"))


def test_auto_compiles_on_the_cpu_when_a_compiler_is_installed(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, on, off = (load_config("smoke", [f"train.compile={v}"]) for v in ("null", "true", "false"))
    assert resolve_compile(auto, cpu) is (shutil.which("g++") is not None or shutil.which("clang++") is not None)
    assert resolve_compile(auto, cuda) is False  # not yet measured on a GPU
    assert resolve_compile(off, cpu) is False
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    assert resolve_compile(auto, cpu) is False  # no compiler: eager, not a crash at the first update
    with pytest.raises(ConfigError, match=r"train.compile=true needs a C\+\+ compiler .* set train.compile=false"):
        resolve_compile(on, cpu)
    with pytest.raises(ConfigError, match=r"needs a C compiler \(gcc\) for Triton"):
        resolve_compile(on, cuda)


@pytest.mark.slow
def test_compiled_runs_are_reproducible_recorded_and_resume_eager(tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    sets = ["--set", "train.total_steps=200", "--set", "train.warmup_steps=100", "--set", "train.eval_every=0"]
    for name in ("a", "b"):
        args = ["--config", "smoke", "--method", "fairgrad", "--run-dir", str(tmp_path / name), "--no-progress"]
        assert main([*args, *sets, "--set", "train.compile=true"]) == 0
    same_seed = [_numbers(tmp_path / name) for name in ("a", "b")]
    assert same_seed[0] == same_seed[1] and len(same_seed[0]) > 2  # same seed, same numbers, compiled too
    assert json.loads((tmp_path / "a" / "run.json").read_text())["compiled"] is True
    # a speed switch, not part of the algorithm: a resumed run may change it
    resume = ["--resume", str(tmp_path / "a"), "--no-progress", "--set", "train.total_steps=300"]
    assert main([*resume, "--set", "train.compile=false"]) == 0
    (resumed,) = (tmp_path / "a").glob("run.resumed-*.json")  # each resumption records its provenance
    assert json.loads(resumed.read_text())["compiled"] is False


def _numbers(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]
