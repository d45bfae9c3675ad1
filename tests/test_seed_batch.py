"""Several seeds trained together (``--seeds``): the same algorithm per seed as a run alone."""

import argparse
import contextlib

import numpy as np
import pytest
import torch

from rl_mtl.agents import MultiTaskSAC, NonFiniteLossError
from rl_mtl.agents.seed_stack import SeedStackedSAC
from rl_mtl.aggregators import make_aggregator
from rl_mtl.aggregators.solvers import sync_free
from rl_mtl.buffers import Batch, MultiTaskReplayBuffer, StackedReplay
from rl_mtl.checkpoint import load_checkpoint
from rl_mtl.config import ConfigError, load_config
from rl_mtl.logging import read_metrics
from rl_mtl.train import EXIT_INTERRUPTED, Trainer, check_trainable_together, main, parse_seeds, run, run_together

K, B, OBS, ACT = 4, 16, 7, 3
FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


def _agents(seeds, architecture="shared"):
    cfg = load_config("smoke", [f"agent.architecture={architecture}"]).agent
    agents = []
    for seed in seeds:
        torch.manual_seed(seed)  # as Trainer does before building its agent
        agents.append(MultiTaskSAC(OBS, ACT, K, cfg, torch.device("cpu"), seed=seed))
    return agents


def _batches(num_seeds, updates, poison=None):
    g = torch.Generator().manual_seed(123)
    out = []
    for u in range(updates):
        reward = torch.randn(num_seeds, K, B, generator=g)
        if poison is not None and u == poison[1]:
            reward[poison[0]] = float("nan")  # this seed's update must be skipped, the others not
        out.append(Batch(
            torch.randn(num_seeds, K, B, OBS, generator=g), torch.rand(num_seeds, K, B, ACT, generator=g) * 2 - 1,
            reward, torch.randn(num_seeds, K, B, OBS, generator=g),
            (torch.rand(num_seeds, K, B, generator=g) < 0.1).float(),
        ))  # fmt: skip
    return out


def _aggregators(method, seeds):
    """(critic, actor) aggregators per seed; PCGrad's task orders seeded per seed, as Trainer does."""

    def options(seed, stream):
        return {"seed": 1000 * seed + stream} if method == "pcgrad" else {}

    return [(make_aggregator(method, **options(s, 1)), make_aggregator(method, **options(s, 2))) for s in seeds]


def _seed_batch(batch, s):
    return Batch(*(getattr(batch, f)[s] for f in FIELDS))


@pytest.mark.parametrize(
    ("method", "architecture", "poison"),
    [
        ("ls", "shared", None),
        ("nashmtl", "shared", None),
        ("fairgrad", "shared", None),
        ("pcgrad", "shared", None),  # its random task orders come from each seed's own generator
        ("cagrad", "multihead", None),
        ("mgda", "shared", (1, 1)),  # seed 1's second update is non-finite: skipped, the others go on
        ("imtlg", "independent", None),
    ],
)
@pytest.mark.parametrize("path", ["cpu path", "gpu path"])
def test_a_seed_batched_update_is_the_single_seed_update_for_every_seed(method, architecture, poison, path):
    """On the GPU path (run here under ``sync_free``) the seeds' aggregators also solve as one
    batch, and every solver runs its whole budget, alone and together."""
    seeds = [0, 1, 2]
    alone, together = _agents(seeds, architecture), _agents(seeds, architecture)
    stack = SeedStackedSAC(together)
    aggs_alone, aggs_together = _aggregators(method, seeds), _aggregators(method, seeds)
    for batch in _batches(len(seeds), 3, poison):
        with sync_free() if path == "gpu path" else contextlib.nullcontext():
            expected = [alone[s].update(_seed_batch(batch, s), *aggs_alone[s], True) for s in range(len(seeds))]
            got = stack.update(batch, [a[0] for a in aggs_together], [a[1] for a in aggs_together], True)
        for s in range(len(seeds)):
            assert bool(got[s]["applied"]) == bool(expected[s]["applied"]), f"seed {s}: skipped in one path only"
            for name, value in expected[s].items():
                torch.testing.assert_close(got[s][name], value, rtol=1e-5, atol=1e-6, equal_nan=True)
    if poison is not None:
        assert together[poison[0]].nonfinite_total == alone[poison[0]].nonfinite_total == 1
        assert sum(a.nonfinite_total for a in together) == 1
    for s in range(len(seeds)):
        expected, got = alone[s].training_state(), together[s].training_state()
        for name, value in expected["modules"].items():
            scale = value.abs().max().clamp(min=1e-12)
            assert (got["modules"][name] - value).abs().max() / scale <= 1e-5, f"seed {s}: {name} differs"
        # the generators were advanced exactly as alone (same draws, same count)
        assert torch.equal(got["generator"], expected["generator"])
        opt_got, opt_exp = got["critic_optimizer"]["state"], expected["critic_optimizer"]["state"]
        assert [float(v["step"]) for v in opt_got.values()] == [float(v["step"]) for v in opt_exp.values()]

    obs = torch.randn(len(seeds), K, OBS)
    acting = torch.stack([alone[s].act(obs[s], deterministic=True) for s in range(len(seeds))])
    torch.testing.assert_close(stack.act(obs, deterministic=True), acting, rtol=1e-5, atol=1e-6)


def test_stacked_replay_draws_each_seed_s_batch_from_its_own_generator():
    alone = [MultiTaskReplayBuffer(K, 50, OBS, ACT, torch.device("cpu"), seed=s) for s in (0, 1)]
    replay = StackedReplay([MultiTaskReplayBuffer(K, 50, OBS, ACT, torch.device("cpu"), seed=s) for s in (0, 1)])
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # wraps around the ring
        t = [torch.randn(2, K, OBS, generator=g), torch.randn(2, K, ACT, generator=g), torch.randn(2, K, generator=g),
             torch.randn(2, K, OBS, generator=g), torch.zeros(2, K)]  # fmt: skip
        replay.add(*t)
        for s, buf in enumerate(alone):
            buf.add(*(x[s] for x in t))
    batch = replay.sample(8)
    for s, buf in enumerate(alone):
        expected = buf.sample(8)
        for name in FIELDS:
            assert torch.equal(getattr(batch, name)[s], getattr(expected, name))
        state = replay.buffers[s].state_dict()  # a seed's checkpoint is that of a buffer of its own
        assert torch.equal(state["obs"], buf.state_dict()["obs"]) and state["position"] == buf.position == 10


def _comparable(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


SHORT = ["train.warmup_steps=100", "train.eval_episodes=1", "train.log_every=50"]


@pytest.mark.slow
def test_seeds_trained_together_draw_the_goals_and_warmup_actions_they_draw_alone(tmp_path):
    """Warm-up, resets and the first updates, run for seeds 0 and 1 alone and together."""
    overrides = [*SHORT, "train.total_steps=150", "train.eval_every=100", "train.checkpoint_every=100"]
    cfgs = [load_config("smoke", overrides, method="nashmtl", seed=s) for s in (0, 1)]
    for cfg in cfgs:
        assert run(cfg, tmp_path / f"alone{cfg.seed}", progress=False) == 0
    assert run_together([(cfg, tmp_path / f"together{cfg.seed}", None) for cfg in cfgs], progress=False) == 0
    for seed in (0, 1):
        alone, together = (
            load_checkpoint(tmp_path / f"{kind}{seed}" / "checkpoint.pt") for kind in ("alone", "together")
        )
        warmup = 100  # random actions, two episodes (one reset of every task: new goals), no update yet
        for name in FIELDS:
            assert torch.equal(together["buffer"][name][:, :warmup], alone["buffer"][name][:, :warmup]), name
        a, t = _comparable(tmp_path / f"alone{seed}"), _comparable(tmp_path / f"together{seed}")
        assert [r["step"] for r in a] == [r["step"] for r in t]
        early = [(ra, rt) for ra, rt in zip(a, t, strict=True) if ra["step"] <= warmup]
        for ra, rt in early:
            assert ra["kind"] == rt["kind"] and ra.keys() == rt.keys()
            if ra["kind"] != "eval":  # random actions: bit for bit
                assert rt == ra
                continue
            # the evaluation's deterministic actions come from the batched policy: float precision
            numbers = {k: v for k, v in ra.items() if k != "kind"}
            assert {k: v for k, v in rt.items() if k != "kind"} == pytest.approx(numbers, rel=1e-6)
            assert {k: v for k, v in rt.items() if "success" in k} == {k: v for k, v in ra.items() if "success" in k}
        # after 50 updates the losses agree to float precision (summation order in batched kernels)
        (a_train,), (t_train,) = ([r for r in x if r["kind"] == "train" and r["step"] == 150] for x in (a, t))
        for key in ("loss/critic_mean", "loss/actor_mean"):
            assert t_train[key] == pytest.approx(a_train[key], rel=1e-3), key
    assert load_checkpoint(tmp_path / "alone0" / "checkpoint.pt")["buffer"]["obs"].shape[1] == 150
    a0, a1 = (load_checkpoint(tmp_path / f"alone{s}" / "checkpoint.pt")["buffer"]["obs"] for s in (0, 1))
    assert not torch.equal(a0, a1), "different seeds must see different goals"


@pytest.mark.slow
def test_seeds_killed_together_resume_together_exactly(tmp_path):
    overrides = [*SHORT, "train.total_steps=200", "train.eval_every=200", "train.checkpoint_every=100"]
    args = ["--config", "smoke", "--method", "pcgrad", "--seeds", "0-1", "--no-progress"]
    sets = [x for o in overrides for x in ("--set", o)]
    assert main([*args, "--run-dir", str(tmp_path / "straight"), *sets]) == 0
    cfgs = [load_config("smoke", overrides, method="pcgrad", seed=s) for s in (0, 1)]
    killed = [(cfg, tmp_path / "killed" / f"seed{cfg.seed}", None) for cfg in cfgs]
    assert run_together(killed, progress=False, stop_at_step=160) == EXIT_INTERRUPTED
    dirs = [str(d) for _, d, _ in killed]
    assert main(["--resume", *dirs, "--no-progress"]) == 0
    for seed in (0, 1):
        straight = _comparable(tmp_path / "straight" / f"seed{seed}")
        assert straight == _comparable(tmp_path / "killed" / f"seed{seed}")
        assert straight[-1]["step"] == 200
    # one seed of the pair continues on its own from the same kind of checkpoint
    assert main(["--resume", dirs[0], "--set", "train.total_steps=250", "--no-progress"]) == 0


def test_seed_lists_and_runs_that_cannot_train_together_are_refused(tmp_path, capsys):
    assert parse_seeds("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    for bad in ("0-", "3-1", "a", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds", "2-1", "--config", "smoke"])
    assert exit_info.value.code == 2 and "invalid seed list '2-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--seeds", "0-1", "--seed", "3", "--config", "smoke"])

    a, b = load_config("smoke", seed=0), load_config("smoke", seed=1)
    check_trainable_together([(a, tmp_path / "a", {"step": 100}), (b, tmp_path / "b", {"step": 100})])
    with pytest.raises(ConfigError, match=r"is at step 100 and .* at step 200"):
        check_trainable_together([(a, tmp_path / "a", {"step": 100}), (b, tmp_path / "b", {"step": 200})])
    with pytest.raises(ConfigError, match=r"differ in agent\.tau"):
        other = load_config("smoke", ["agent.tau=0.1"], seed=1)
        check_trainable_together([(a, tmp_path / "a", None), (other, tmp_path / "b", None)])
    with pytest.raises(ConfigError, match="are both seed 0"):
        check_trainable_together([(a, tmp_path / "a", None), (a, tmp_path / "b", None)])
    assert main(["--resume", str(tmp_path / "a"), "--seeds", "0-1"]) == 2
    assert "--seeds starts new runs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_seed_whose_updates_stay_non_finite_stops_the_batch_at_one_checkpoint_step(tmp_path, monkeypatch):
    """Seed 1's rewards are all nan: its updates are skipped on the device, and the batch stops
    at the first checkpoint after the limit, before ANY seed saves there, so the seeds' last
    checkpoints are of one step (resumable together, or the healthy ones alone)."""
    original = Trainer.receive

    def receive(self):
        packed, terminated, truncated = original(self)
        if self.cfg.seed == 1:
            packed[:, -2] = np.nan  # the rewards column
        return packed, terminated, truncated

    monkeypatch.setattr(Trainer, "receive", receive)
    # 50-step episodes: checkpoints due at steps 100 (end of the warm-up) and 150
    overrides = ["train.max_nonfinite_updates=5", "train.checkpoint_every=50", "train.log_every=100"]
    cfgs = [load_config("smoke", overrides, method="nashmtl", seed=s) for s in (0, 1)]
    with pytest.raises(NonFiniteLossError, match=r"seed1: 50 consecutive updates"):
        run_together([(cfg, tmp_path / f"seed{cfg.seed}", None) for cfg in cfgs], progress=False)
    assert [load_checkpoint(tmp_path / f"seed{s}" / "checkpoint.pt")["step"] for s in (0, 1)] == [100, 100]
    monkeypatch.undo()
    assert main(["--resume", str(tmp_path / "seed0"), "--set", "train.total_steps=150", "--no-progress"]) == 0
