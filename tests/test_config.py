"""Config loading, overrides and the messages for bad values."""

import pytest

from rl_mtl.config import ConfigError, diff_configs, load_config, parse_override


def test_presets_load_and_defaults_are_the_modern_protocol():
    cfg = load_config("mt10")
    assert cfg.env.benchmark == "MT10" and cfg.env.one_hot and cfg.env.max_episode_steps == 500
    assert cfg.train.total_steps == 2_000_000 and cfg.train.batch_size_per_task == 128
    assert cfg.agent.hidden_sizes == [400, 400, 400] and cfg.agent.temperature == "per_task"
    paper = load_config("mt10-paper")
    assert not paper.env.one_hot and paper.env.goal_mode == "fixed" and paper.env.max_episode_steps == 150
    assert paper.agent.temperature == "shared" and paper.agent.init == "xavier" and paper.train.eval_episodes == 1
    assert load_config("smoke").agent.hidden_sizes == [32, 32]


def test_overrides_parse_yaml_values_and_reach_nested_keys():
    cfg = load_config("smoke", ["train.total_steps=1000", "agent.hidden_sizes=[8, 8]", "method_options.cagrad.c=0.5"])
    assert cfg.train.total_steps == 1000 and cfg.agent.hidden_sizes == [8, 8]
    assert cfg.method_options["cagrad"] == {"c": 0.5}
    assert load_config("smoke", method="cagrad", seed=4).seed == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.total_step=5"], "unknown config key 'train.total_step'; valid keys here: total_steps"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["train.total_steps=abc"], "train.total_steps: expected an integer, got 'abc'"),
        (["train.total_steps=0"], r"train.total_steps must be > 0"),
        (["agent.gamma=1.5"], r"agent.gamma must be in \(0, 1\)"),
        (
            ["agent.architecture=moe"],
            "agent.architecture: unknown value .moe.; choose one of: shared, multihead, independent, soft_modul",
        ),
        (["env.one_hot=maybe"], "env.one_hot: expected true or false"),
        (["env.benchmark=MT1"], "MT1 needs exactly one task name"),
        (["method_options.cagrad.alpha=1"], "method_options.cagrad: cagrad: unknown option"),
        (["method_options.nash.x=1"], "unknown method"),
        (["train.total_steps"], "--set expects key=value"),
        (["train.overlap_env=true"], r"train.overlap_env=true needs env.vector_strategy=async"),
        # NaN and inf are refused for every number; ranges follow Meta-World and numpy
        (["agent.actor_lr=.nan"], "agent.actor_lr: expected a finite number, got nan"),
        (["agent.log_std_max=.inf"], "agent.log_std_max: expected a finite number, got inf"),
        (["env.reward_norm_rate=-.inf"], "env.reward_norm_rate: expected a finite number"),
        (["agent.target_entropy=.nan"], "agent.target_entropy: expected a finite number"),
        (["env.max_episode_steps=600"], "Meta-World ends every episode at 500 steps"),
        (["seed=-1"], r"seed must be in \[0, 4294967295\]"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, message):
    method = "cagrad" if "cagrad" in overrides[0] else None
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides, method=method)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="method: unknown value 'nash'; choose one of: ls, nashmtl"):
        load_config("smoke", method="nash")


def test_missing_config_file_lists_presets(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"config file 'nope.yaml' not found.*mt10, mt10-care, mt10-moore, mt10-paper, mt10-sm, mt3, smoke",
    ):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_parse_override_and_diff():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    a, b = load_config("smoke"), load_config("smoke", ["train.total_steps=999", "agent.tau=0.01"])
    assert diff_configs(a, b) == ["agent.tau", "train.total_steps"]
    assert diff_configs(a, b, allowed=("train.total_steps",)) == ["agent.tau"]
