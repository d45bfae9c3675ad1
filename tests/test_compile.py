"""train.compile: the compiled update (its passes, or the whole of it as one graph) is the eager
update (to float precision), and the switch's automatic setting and its errors."""

import json
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from rl_mtl.agents import SAC, MetricSums, Population
from rl_mtl.buffers import Batch
from rl_mtl.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rl_mtl.config import ConfigError, load_config
from rl_mtl.metrics import read_metrics
from rl_mtl.runtime import resolve_compile
from rl_mtl.train import main

K, B, OBS, ACT = 4, 16, 7, 3
TASKS = [f"task{k}" for k in range(K)]


def _population(seeds, device, mode, method="nashmtl", options=None):
    sac = SAC(OBS, ACT, TASKS, load_config("smoke").agent, method, options, compile=mode == "passes")
    return Population(sac, seeds, device, compile=mode)


def _batch(seeds, device, generator):
    def rand(*shape):
        return torch.randn(seeds, *shape, generator=generator).to(device)

    terminated = (torch.rand(seeds, K, B, generator=generator) < 0.1).float().to(device)
    return Batch(rand(K, B, OBS), rand(K, B, ACT).clamp(-1, 1), rand(K, B), rand(K, B, OBS), terminated)


def _assert_same_update(seeds, device, mode, nan_seed=None, method="nashmtl", options=None):
    """Two updates of identically initialised populations, eager and compiled: same metrics, sums
    and parameters to float precision (the compiled kernels may sum in another order). With
    ``nan_seed``, that seed's second batch has a NaN reward: both skip its update alike. A method
    that learns (``learn_every``) learns on both updates, with held-out batches if it asks."""
    eager, compiled = (_population(seeds, device, m, method, options) for m in ("off", mode))
    agg = eager.sac.aggregator
    sums = [MetricSums(len(seeds), K, device) for _ in range(2)]
    g = torch.Generator().manual_seed(7)
    for i in range(2):
        batch = _batch(len(seeds), device, g)
        if i == 1 and nan_seed is not None:
            batch.reward[nan_seed, 0, 0] = float("nan")
        learn = agg.learn_every > 0
        held_out = _batch(len(seeds), device, g) if learn and agg.needs_held_out else None
        expected = eager.update(batch, True, learn, held_out, sums=sums[0])
        got = compiled.update(batch, True, learn, held_out, sums=sums[1])
        assert got["applied"].tolist() == [i == 0 or s != nan_seed for s in range(len(seeds))]
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    for mine, theirs in zip(sums[1].tensors(), sums[0].tensors(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)
    flat_eager = torch.utils._pytree.tree_flatten_with_path(eager.state)[0]
    flat_compiled = dict(torch.utils._pytree.tree_flatten_with_path(compiled.state)[0])
    for path, value in flat_eager:
        mine = flat_compiled[path]
        if value.is_floating_point():
            assert (mine - value).abs().max() / value.abs().max().clamp(min=1e-12) <= 1e-5, path
        else:
            assert torch.equal(mine, value), path


@pytest.mark.parametrize("seeds", [[0], [0, 1]], ids=["one seed", "two seeds"])
def test_the_compiled_passes_are_the_eager_update(seeds):
    torch._dynamo.reset()  # compile afresh, so that the counters below see it happen
    counters.clear()
    _assert_same_update(seeds, torch.device("cpu"), "passes")
    # the three passes (TD target, critic, actor gradients) ran as compiled graphs, without breaks
    assert counters["stats"]["unique_graphs"] >= 3
    assert not counters["graph_break"]


def test_a_method_s_own_learning_runs_in_the_compiled_passes():
    """AuxiNash's ``learn`` (its held-out pass: Hessian-vector products, the power step) compiled
    with the passes gives the eager numbers, powers included, without a graph break."""
    torch._dynamo.reset()
    counters.clear()
    _assert_same_update([0, 1], torch.device("cpu"), "passes", method="auxinash", options={"main_task": TASKS[1]})
    assert not counters["graph_break"]


def test_the_whole_update_compiles_to_one_graph_that_is_the_eager_update():
    """Everything an update does (the Nash-MTL solves, the optimiser steps, a seed's skip, the
    metric sums) in one graph without breaks (``fullgraph`` would raise at one, and the counters
    show none)."""
    torch._dynamo.reset()
    counters.clear()
    _assert_same_update([0, 1], torch.device("cpu"), "whole", nan_seed=1)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["passes", "whole", "graphs"])
def test_the_compiled_update_is_the_eager_update_on_cuda(mode):
    _assert_same_update([0, 1], torch.device("cuda"), mode, nan_seed=1)


def test_a_host_side_solver_is_refused_where_the_whole_update_is_compiled(tmp_path, capsys):
    host = ["--set", "train.compile=whole", "--set", "method_options.nashmtl={solver: cvxpy}"]
    assert main(["--config", "smoke", "--method", "nashmtl", "--run-dir", str(tmp_path / "r"), *host]) == 2
    assert "solves on the host; use its native solver or train.compile=passes" in capsys.readouterr().err


def test_auto_compiles_on_the_cpu_when_a_compiler_is_installed(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, on, off, whole, graphs = (load_config("smoke", [f"train.compile={v}"])
                                    for v in ("null", "true", "false", "whole", "graphs"))  # fmt: skip
    has_compiler = shutil.which("g++") is not None or shutil.which("clang++") is not None
    assert resolve_compile(auto, cpu) == ("passes" if has_compiler else "off")
    assert resolve_compile(auto, cuda) == "off"  # not yet measured on a GPU
    assert (resolve_compile(on, cpu), resolve_compile(off, cpu)) == ("passes", "off")
    with pytest.raises(ConfigError, match=r"train.compile=graphs .* needs --device cuda; on the CPU use .*=whole"):
        resolve_compile(graphs, cpu)
    with pytest.raises(ConfigError, match=r"imtlg .* train.compile=whole"):
        resolve_compile(load_config("smoke", ["train.compile=graphs"], method="imtlg"), cuda)
    with pytest.raises(ConfigError, match=r"train.compile: unknown value 'fast'; choose one of: off, passes, whole"):
        load_config("smoke", ["train.compile=fast"])
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    assert resolve_compile(auto, cpu) == "off"  # no compiler: eager, not a crash at the first update
    with pytest.raises(ConfigError, match=r"train.compile=True needs a C\+\+ compiler .* set train.compile=off"):
        resolve_compile(on, cpu)
    with pytest.raises(ConfigError, match=r"train.compile=whole needs a C\+\+ compiler"):
        resolve_compile(whole, cpu)
    with pytest.raises(ConfigError, match=r"needs a C compiler \(gcc\) for Triton"):
        resolve_compile(on, cuda)


@pytest.mark.slow
def test_a_whole_compiled_run_resumes_exactly_and_records_its_mode(tmp_path):
    """A run killed after a checkpoint and resumed in the same mode continues with exactly the
    numbers of one that was not; a resumed run may change the mode (a speed switch), which its
    provenance records."""
    from rl_mtl.train import EXIT_INTERRUPTED, run

    if shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    sets = ["env.benchmark=custom", "env.tasks=[reach-v3, window-close-v3]",
            "train.total_steps=200", "train.warmup_steps=100", "train.eval_every=0", "train.checkpoint_every=50",
            "train.log_every=25", "train.compile=whole"]  # fmt: skip
    cfg = load_config("smoke", sets, method="ls")  # the mode, not the method, is under test: the smallest graph
    assert run([(cfg, tmp_path / "a", None)], progress=False) == 0
    assert run([(cfg, tmp_path / "b", None)], progress=False, stop_at_step=170) == EXIT_INTERRUPTED
    assert run([(cfg, tmp_path / "b", load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME))], progress=False) == 0
    straight, resumed = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert straight == resumed and len(straight) > 4
    assert json.loads((tmp_path / "a" / "run.json").read_text())["compile"] == "whole"
    resume = ["--resume", str(tmp_path / "a"), "--no-progress", "--set", "train.total_steps=250"]
    assert main([*resume, "--set", "train.compile=off"]) == 0
    (resumed_info,) = (tmp_path / "a").glob("run.resumed-*.json")  # each resumption records its provenance
    assert json.loads(resumed_info.read_text())["compile"] == "off"


def _numbers(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]
