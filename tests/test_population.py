"""A population of seeds (``--seeds``): every seed gets the update, goals and checkpoints it gets
alone."""

import argparse
import contextlib

import pytest
import torch

from rl_mtl.agents import SAC, NonFiniteLossError, Population
from rl_mtl.aggregators.solvers import sync_free
from rl_mtl.buffers import FIELDS, Batch
from rl_mtl.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rl_mtl.config import ConfigError, load_config, parse_seeds
from rl_mtl.metrics import read_metrics
from rl_mtl.resume import check_trainable_together
from rl_mtl.train import EXIT_INTERRUPTED, main, run
from rl_mtl.training import Training

K, B, OBS, ACT = 4, 16, 7, 3
TASKS = [f"task{k}" for k in range(K)]
CPU = torch.device("cpu")


def _sac(method, architecture="shared"):
    return SAC(OBS, ACT, TASKS, load_config("smoke", [f"agent.architecture={architecture}"]).agent, method)


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


def _one_seed(batch, s):
    return Batch(*(getattr(batch, f)[s : s + 1] for f in FIELDS))


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
def test_a_seed_in_a_population_gets_the_update_it_gets_alone(method, architecture, poison, path):
    """On the GPU path (run here under ``sync_free``) the seeds' aggregators also solve as one
    batch, and every solver runs its whole budget, alone and together."""
    seeds = [0, 1, 2]
    sac = _sac(method, architecture)
    together = Population(sac, seeds, CPU)
    alone = [Population(sac, [seed], CPU) for seed in seeds]
    for batch in _batches(len(seeds), 3, poison):
        with sync_free() if path == "gpu path" else contextlib.nullcontext():
            expected = [alone[s].update(_one_seed(batch, s), True) for s in range(len(seeds))]
            got = together.update(batch, True)
        for s in range(len(seeds)):
            assert bool(got["applied"][s]) == bool(expected[s]["applied"][0]), f"seed {s}: skipped in one path only"
            for name, value in expected[s].items():
                torch.testing.assert_close(got[name][s], value[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    skips = [c[0] for c in together.skip_counts()]
    assert skips == [int(poison is not None and s == poison[0]) for s in range(3)]
    for s in range(len(seeds)):
        expected, got = alone[s].seed_state(0), together.seed_state(s)
        for (path_e, value), (path_g, mine) in zip(_leaves(expected["agent"]), _leaves(got["agent"]), strict=True):
            assert path_e == path_g
            if value.is_floating_point():
                scale = value.abs().max().clamp(min=1e-12)
                assert (mine - value).abs().max() / scale <= 1e-5, f"seed {s}: {path_e} differs"
            else:
                assert torch.equal(mine, value), f"seed {s}: {path_e} differs"
        # the generators were advanced exactly as alone (same draws, same count)
        assert torch.equal(got["generator"], expected["generator"])

    obs = torch.randn(len(seeds), K, OBS)
    acting = torch.cat([alone[s].act(obs[s : s + 1], deterministic=True) for s in range(len(seeds))])
    torch.testing.assert_close(together.act(obs, deterministic=True), acting, rtol=1e-5, atol=1e-6)


def _leaves(tree):
    return torch.utils._pytree.tree_flatten_with_path(tree)[0]


def test_a_seed_state_resumes_in_another_slot_of_another_population():
    sac = _sac("nashmtl")
    source, target = Population(sac, [0, 1], CPU), Population(sac, [7], CPU)
    for batch in _batches(2, 2):
        source.update(batch)
    target.load_seed_state(0, source.seed_state(1))
    batch = _batches(2, 3)[2]
    torch.testing.assert_close(target.update(_one_seed(batch, 1))["critic_loss"][0],
                               source.update(batch)["critic_loss"][1], rtol=1e-5, atol=1e-6)  # fmt: skip


def _comparable(run_dir):
    records, bad = read_metrics(run_dir / "metrics.jsonl")
    assert bad == 0
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


# three tasks rather than MT10's ten: the seeding and resume paths are the same, the env steps 3x fewer
SHORT = ["env.benchmark=custom", "env.tasks=[reach-v3, drawer-close-v3, window-close-v3]",
         "train.warmup_steps=100", "train.eval_episodes=1", "train.log_every=50"]  # fmt: skip


@pytest.mark.slow
def test_seeds_trained_together_draw_the_goals_and_warmup_actions_they_draw_alone(tmp_path):
    """Warm-up, resets and the first updates, run for seeds 0 and 1 alone and together."""
    overrides = [*SHORT, "train.total_steps=150", "train.eval_every=100", "train.checkpoint_every=100"]
    cfgs = [load_config("smoke", overrides, method="nashmtl", seed=s) for s in (0, 1)]
    for cfg in cfgs:
        assert run([(cfg, tmp_path / f"alone{cfg.seed}", None)], progress=False) == 0
    assert run([(cfg, tmp_path / f"together{cfg.seed}", None) for cfg in cfgs], progress=False) == 0
    for seed in (0, 1):
        alone, together = (
            load_checkpoint(tmp_path / f"{kind}{seed}" / CHECKPOINT_NAME) for kind in ("alone", "together")
        )
        warmup = 100  # random actions, two episodes (one reset of every task: new goals), no update yet
        for name in FIELDS:
            assert torch.equal(together["replay"][name][:, :warmup], alone["replay"][name][:, :warmup]), name
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
    assert load_checkpoint(tmp_path / "alone0" / CHECKPOINT_NAME)["replay"]["obs"].shape[1] == 150
    a0, a1 = (load_checkpoint(tmp_path / f"alone{s}" / CHECKPOINT_NAME)["replay"]["obs"] for s in (0, 1))
    assert not torch.equal(a0, a1), "different seeds must see different goals"


@pytest.mark.slow
def test_seeds_killed_together_resume_together_exactly(tmp_path):
    overrides = [*SHORT, "train.total_steps=200", "train.eval_every=200", "train.checkpoint_every=100"]
    args = ["--config", "smoke", "--method", "pcgrad", "--seeds", "0-1", "--no-progress"]
    sets = [x for o in overrides for x in ("--set", o)]
    assert main([*args, "--run-dir", str(tmp_path / "straight"), *sets]) == 0
    cfgs = [load_config("smoke", overrides, method="pcgrad", seed=s) for s in (0, 1)]
    killed = [(cfg, tmp_path / "killed" / f"seed{cfg.seed}", None) for cfg in cfgs]
    assert run(killed, progress=False, stop_at_step=160) == EXIT_INTERRUPTED
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
    check_trainable_together([(a, tmp_path / "a", None)])
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
    original = Training.receive

    def receive(self):
        next_obs, reward, terminated, done = original(self)
        reward[1] = float("nan")  # seed 1's rewards
        return next_obs, reward, terminated, done

    monkeypatch.setattr(Training, "receive", receive)
    # 50-step episodes: checkpoints due at steps 100 (end of the warm-up) and 150
    overrides = [*SHORT[:2], "train.max_nonfinite_updates=5", "train.checkpoint_every=50", "train.log_every=100"]
    cfgs = [load_config("smoke", overrides, method="nashmtl", seed=s) for s in (0, 1)]
    with pytest.raises(NonFiniteLossError, match=r"seed1: 50 consecutive updates"):
        run([(cfg, tmp_path / f"seed{cfg.seed}", None) for cfg in cfgs], progress=False)
    assert [load_checkpoint(tmp_path / f"seed{s}" / CHECKPOINT_NAME)["step"] for s in (0, 1)] == [100, 100]
    monkeypatch.undo()
    assert main(["--resume", str(tmp_path / "seed0"), "--set", "train.total_steps=150", "--no-progress"]) == 0
