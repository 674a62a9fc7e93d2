"""Config: typed fields, validation naming the key, recipes, overrides, files, and the CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from r1mega.cli import main
from r1mega.config import Config, ConfigError, GRPOConfig, parse_value
from r1mega.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_and_round_trips_through_json(name, tmp_path):
    cfg = get_recipe(name)
    path = cfg.save(tmp_path / "run")
    assert Config().with_file(path) == cfg


def test_every_field_is_documented_and_typed():
    for key in Config.keys():
        assert len(Config.describe(key)) > 10, key


def test_every_field_is_read_by_some_code():
    """A knob no code reads is a defect: each field must be read as an attribute (``.field``)
    somewhere in the package or the launchers, its own declaration aside."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    sources = []
    for path in [*(root / "r1mega").rglob("*.py"), *(root / "launchers").rglob("*.py")]:
        text = path.read_text()
        if path.name == "config.py" and path.parent.name == "r1mega":
            text = re.sub(r"(?m)^\s+\w+: [^=\n]+= knob\(", "", text)
        sources.append(text)
    code = "\n".join(sources)
    unread = [key for key in Config.keys() if not re.search(rf"\.{key.split('.')[1]}\b", code)]
    assert not unread, f"config fields no code reads: {unread}"


def test_custom_reward_is_imported_by_name():
    from r1mega.rewards import format_reward, pool_kwargs

    cfg = Config().with_overrides(["rewards.custom=r1mega.rewards:format_reward", "rewards.custom_weight=0.5"])
    kwargs = pool_kwargs(cfg.rewards)
    assert kwargs["weights"]["custom"] == 0.5 and kwargs["rewards"] == {"custom": format_reward}
    with pytest.raises(ConfigError, match="rewards.custom: 'r1mega.rewards:nope': module 'r1mega.rewards' has no"):
        pool_kwargs(Config().with_overrides(["rewards.custom=r1mega.rewards:nope"]).rewards)
    with pytest.raises(ConfigError, match="rewards.custom: 'x' is not"):
        Config().with_overrides(["rewards.custom=x"])


def test_overrides_are_parsed_by_the_declared_type():
    cfg = Config().with_overrides(["grpo.eps_high=0.28", "grpo.dual_clip=3", "grpo.tis=false",
                                   "grpo.tis_cap=none", "run.seed=7", "grpo.agg=seq-mean-token-sum"])
    assert cfg.grpo.eps_high == 0.28 and cfg.grpo.dual_clip == 3.0 and isinstance(cfg.grpo.dual_clip, float)
    assert cfg.grpo.tis is False and cfg.grpo.tis_cap is None and cfg.run.seed == 7
    assert cfg.grpo.agg == "seq-mean-token-sum"


def test_overrides_apply_in_order_and_validate_the_whole():
    # tis_cap must be cleared before tis can be switched off; one batch validates the end state.
    cfg = Config().with_overrides(["grpo.tis=false", "grpo.tis_cap=none"])
    assert not cfg.grpo.tis
    with pytest.raises(ConfigError, match=r"grpo\.tis_cap: 2\.0 is set but grpo\.tis is false"):
        Config().with_overrides(["grpo.tis=false"])


@pytest.mark.parametrize("assignment, message", [
    ("grpo.eps_hihg=0.3", r"unknown key 'grpo\.eps_hihg'; did you mean 'grpo\.eps_high'\?"),
    ("gpro.kl_coef=0", r"did you mean 'grpo\.kl_coef'\?"),
    ("grpo.eps_low=-0.1", r"grpo\.eps_low: -0\.1 must be >= 0\.0"),
    ("grpo.eps_low=abc", r"grpo\.eps_low: 'abc' is not a float"),
    ("grpo.group_size=2.5", r"grpo\.group_size: '2\.5' is not an int"),
    ("grpo.dual_clip=1.0", r"grpo\.dual_clip: 1\.0 must be > 1\.0"),
    ("grpo.agg=mean", r"grpo\.agg: 'mean' is not one of 'token-mean'"),
    ("grpo.kl_estimator=k4", r"grpo\.kl_estimator: 'k4' is not one of"),
    ("grpo.tis=maybe", r"grpo\.tis: 'maybe' is not a bool"),
    ("grpo.norm_length=512", r"grpo\.norm_length: norm_length is only used by agg in \('seq-mean-token-sum-norm',\), "
                             r"not by agg='token-mean'$"),
    ("rollout.top_p=1.5", r"rollout\.top_p: 1\.5 must be <= 1\.0"),
    ("run.name=a/b", r"run\.name: 'a/b' must be a non-empty name"),
    ("grpo.eps_low", r"expected section\.field=value"),
])
def test_bad_overrides_name_the_key_and_value(assignment, message):
    with pytest.raises(ConfigError, match=message):
        Config().with_overrides([assignment])


def test_construction_validates_types_directly():
    with pytest.raises(ConfigError, match=r"grpo\.group_size: '16' is not an int"):
        GRPOConfig(group_size="16")
    with pytest.raises(ConfigError, match=r"grpo\.tis: 1 is not a bool"):
        GRPOConfig(tis=1)
    assert GRPOConfig(kl_coef=0).kl_coef == 0.0 and isinstance(GRPOConfig(kl_coef=0).kl_coef, float)


def test_configs_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().grpo.eps_low = 0.5  # type: ignore[misc]


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grpo": {"eps_low": "x"}}))
    with pytest.raises(ConfigError, match=rf"{bad}: grpo\.eps_low: 'x' is not a float"):
        Config().with_file(bad)
    torn = tmp_path / "torn.json"
    torn.write_text('{"grpo": ')
    with pytest.raises(ConfigError, match=rf"{torn}: cannot read a JSON config"):
        Config().with_file(torn)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"grpo": {"clip": 0.2}}))
    with pytest.raises(ConfigError, match=rf"{unknown}: unknown key 'grpo\.clip'"):
        Config().with_file(unknown)


def test_parse_value_none_only_for_optional_fields():
    assert parse_value("grpo.kl_clamp", "null") is None
    with pytest.raises(ConfigError):
        Config().with_overrides(["grpo.eps_low=none"])


def test_cli_dry_run_prints_the_resolved_config(capsys):
    assert main(["--recipe", "verl-grpo", "--set", "grpo.eps_high=0.28", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["grpo"]["eps_high"] == 0.28 and printed["grpo"]["dual_clip"] == 3.0
    assert printed == get_recipe("verl-grpo").with_overrides(["grpo.eps_high=0.28"]).to_dict()


def test_cli_config_file_then_sets(tmp_path, capsys):
    path = get_recipe("r1-zero").save(tmp_path)
    assert main(["--config", str(path), "--set", "run.seed=3", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run"]["seed"] == 3 and printed["grpo"]["eps_high"] == 10.0


@pytest.mark.parametrize("argv, message", [
    (["--set", "grpo.eps_hgh=0.3", "--dry-run"], "did you mean 'grpo.eps_high'?"),
    (["--recipe", "dapoo", "--dry-run"], "did you mean 'dapo'?"),
    (["--set", "grpo.eps_low=x", "--dry-run"], "grpo.eps_low: 'x' is not a float"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_lists_recipes_and_keys(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in Config.keys())


def test_installed_console_script_runs():
    result = subprocess.run(["r1mega", "--recipe", "dapo", "--dry-run"], capture_output=True, text=True,
                            env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["grpo"]["eps_high"] == 0.28
