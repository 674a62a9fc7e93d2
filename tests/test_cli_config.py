"""One configuration system: every r1mega command resolves --recipe/--config/--set (and its flags,
aliases of keys) into the typed Config its function runs with. The command functions are
replaced by a capture, so nothing heavy runs."""

from __future__ import annotations

import importlib
import json

import pytest

from r1mega import cli
from r1mega.config import Config
from r1mega.recipes import RECIPES, get_recipe

# the command-line-only arguments each command needs to parse
REQUIRED = {
    "reward": ["--data", "d.jsonl", "--completions", "c.jsonl"],
    "synth": ["arithmetic", "--out", "o.jsonl"],
    "convert": ["--hf", "hf", "--to-hf", "out"],
    "pretrain": [],
    "sample": ["--model", "m", "--out", "o.jsonl"],
    "rm": ["--out", "rm"],
    "distill": ["--teacher", "t", "--out", "d"],
    "eval": ["--model", "m"],
    "pipeline": [],
    "plot": ["run"],
    "plan": [],
}
# a key of each command's own section (or the section it reads), a value and its parsed form
OWN_KEY = {
    "reward": ("rewards.format_weight", "0.5", 0.5),
    "synth": ("synth.n", "7", 7),
    "convert": ("parallel.tp", "2", 2),
    "pretrain": ("pretrain.steps", "9", 9),
    "sample": ("sample.samples", "3", 3),
    "rm": ("rm.epochs", "2", 2),
    "distill": ("distill.max_per_prompt", "3", 3),
    "eval": ("eval.top_p", "0.9", 0.9),
    "pipeline": ("pipeline.heldout_problems", "10", 10),
    "plot": ("run.name", "plotted", "plotted"),
    "plan": ("plan.nnodes", "2", 2),
}
# a valid value other than the default for every key a flag is an alias of: (text, parsed)
FLAG_VALUES = {
    "run.model": ("some/model", "some/model"), "run.data": ("p.jsonl", "p.jsonl"),
    "run.heldout": ("h.jsonl", "h.jsonl"), "sft.data": ("s.jsonl", "s.jsonl"), "run.seed": ("5", 5),
    "run.template": ("chat", "chat"), "rewards.format_style": ("summary", "summary"), "data.format": ("gsm8k", "gsm8k"),
    "synth.n": ("7", 7), "synth.difficulty": ("3", 3), "synth.split": ("test", "test"), "synth.style": ("r1", "r1"),
    "parallel.tp": ("2", 2), "parallel.pp": ("2", 2), "parallel.ep": ("4", 4), "parallel.etp": ("1", 1),
    "convert.dtype": ("bfloat16", "bfloat16"), "pretrain.out": ("base", "base"), "pretrain.steps": ("9", 9),
    "sample.samples": ("3", 3), "sample.max_per_prompt": ("2", 2), "sample.temperature": ("0.9", 0.9),
    "sample.top_p": ("0.8", 0.8), "sample.max_new_tokens": ("64", 64), "sample.max_tokens": ("50", 50),
    "sample.min_language": ("0.5", 0.5), "sample.max_repeats": ("6", 6), "sample.judge": ("pkg.mod:fn", "pkg.mod:fn"),
    "sample.max_prompts": ("11", 11), "rm.data": ("pairs.jsonl", "pairs.jsonl"), "rm.heldout": ("hp.jsonl", "hp.jsonl"),
    "rm.epochs": ("2", 2), "rm.lr": ("0.001", 0.001), "rm.batch_size": ("4", 4), "rm.max_length": ("512", 512),
    "distill.samples": ("2", 2), "distill.max_per_prompt": ("3", 3), "distill.temperature": ("0.9", 0.9),
    "distill.max_prompts": ("12", 12), "distill.max_heldout": ("13", 13), "distill.max_new_tokens": ("64", 64),
    "eval.samples": ("8", 8), "eval.temperature": ("0.7", 0.7), "eval.top_p": ("0.9", 0.9),
    "eval.max_new_tokens": ("32", 32), "eval.max_prompts": ("5", 5), "distill.format_style": ("answer-tags", "answer-tags"),
    "pipeline.out": ("elsewhere", "elsewhere"), "pipeline.base_model": ("my-base", "my-base"), "plan.nnodes": ("2", 2), "plan.nproc_per_node": ("4", 4),
}


def _capture(monkeypatch, command: str) -> dict:
    """Replace `command`'s function by one that records the Config and keywords it gets."""
    seen: dict = {}
    module, name, _ = cli.COMMANDS[command]

    def fake(cfg, **kwargs):
        seen["cfg"], seen["kwargs"] = cfg, kwargs
        return 0

    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen


def _argv(command: str, *options: str) -> list[str]:
    if command == "plan":  # plan's own options come before the COMMAND it plans
        return ["plan", *options, "train"]
    return [command, *REQUIRED[command], *options]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_config_file_and_set_reach_the_command(command, tmp_path, monkeypatch):
    seen = _capture(monkeypatch, command)
    key, text, value = OWN_KEY[command]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"seed": 7}, "optim": {"lr": 0.25}}))
    assert cli.main(_argv(command, "--config", str(path), "--set", f"{key}={text}", "--set", "run.steps=3")) == 0
    cfg = seen["cfg"]
    assert isinstance(cfg, Config)
    assert (cfg.run.seed, cfg.optim.lr, cfg.run.steps) == (7, 0.25, 3)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    expected_recipe = cli.DEFAULT_RECIPES.get(command, cli.DEFAULT_RECIPE)
    assert cfg.run.name == (value if key == "run.name" else get_recipe(expected_recipe).run.name)
    # a recipe by name, too
    assert cli.main(_argv(command, "--recipe", "dapo")) == 0
    assert seen["cfg"].grpo.eps_high == 0.28


@pytest.mark.parametrize("command", ["train", "sft"])
def test_train_and_sft_resolve_config_and_flags(command, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"seed": 7}}))
    argv = [command, "--config", str(path), "--set", "run.steps=3", "--model", "m", "--data", "d.jsonl", "--dry-run"]
    assert cli.main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["run"]["seed"], cfg["run"]["steps"], cfg["run"]["model"]) == (7, 3, "m")
    assert (cfg["run"]["data"] if command == "train" else cfg["sft"]["data"]) == "d.jsonl"
    assert cfg["run"]["name"] == ("tiny" if command == "train" else "tiny-cold-start")


def test_every_flag_key_has_a_test_value():
    keys = {f.key for flags in cli.FLAG_KEYS.values() for f in flags if f.const is None}
    assert keys <= set(FLAG_VALUES), keys - set(FLAG_VALUES)
    assert all(key in Config.keys() for key in keys)


@pytest.mark.parametrize("command, flag", [(c, f) for c, flags in sorted(cli.FLAG_KEYS.items()) for f in flags],
                         ids=lambda x: x if isinstance(x, str) else x.flag)
def test_each_flag_equals_its_key(command, flag):
    required = list(REQUIRED.get(command, []))
    if flag.flag in required:  # e.g. sample's --model: given by the flag or by the key, not both
        i = required.index(flag.flag)
        del required[i:i + 2]
    if flag.const is not None:
        given, setting = [flag.flag], f"{flag.key}={str(flag.const).lower()}"
        value = flag.const
    else:
        text, value = FLAG_VALUES[flag.key]
        given, setting = [flag.flag, text], f"{flag.key}={text}"
    section, name = flag.key.split(".")
    parser = cli._parser()
    by_flag = cli.command_config(parser.parse_args([command, *required, *given]))
    by_key = cli.command_config(parser.parse_args([command, *required, "--set", setting]))
    assert getattr(getattr(by_flag, section), name) == value
    assert getattr(getattr(cli.command_config(parser.parse_args([command, *required])), section), name) != value
    assert by_flag == by_key


def test_a_flag_wins_over_set():
    args = cli._parser().parse_args(["sample", "--model", "m", "--out", "o", "--set", "sample.samples=3",
                                     "--samples", "5", "--set", "run.model=other"])
    cfg = cli.command_config(args)
    assert (cfg.sample.samples, cfg.run.model) == (5, "m")


@pytest.mark.parametrize("command", sorted(cli.COMMANDS) + ["train", "sft"])
@pytest.mark.parametrize("bad, message", [
    (["--set", "sample.samplez=3"], "unknown key 'sample.samplez'; did you mean 'sample.samples'?"),
    (["--set", "nosection.x=1"], "unknown key 'nosection.x'"),
    (["--set", "rm.epochs=0"], "rm.epochs: 0 must be >= 1"),
    (["--recipe", "tinyy"], "unknown recipe 'tinyy'"),
])
def test_bad_keys_are_one_line_and_exit_2(command, bad, message, monkeypatch, capsys):
    if command in cli.COMMANDS:
        seen = _capture(monkeypatch, command)
    argv = _argv(command, *bad) if command in cli.COMMANDS else [command, *bad]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("r1mega: error: ")
    if command in cli.COMMANDS:
        assert not seen  # refused before the command ran


def test_a_bad_flag_value_names_the_flag(capsys):
    assert cli.main(["sample", "--model", "m", "--out", "o", "--samples", "x"]) == 2
    assert capsys.readouterr().err == "r1mega: error: --samples: sample.samples: 'x' is not an int\n"
    assert cli.main(["rm", "--out", "o", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "r1mega: error: --epochs: rm.epochs: 0 must be >= 1\n"
    assert cli.main(["convert", "--hf", "a", "--to-hf", "b", "--dtype", "int8"]) == 2
    assert "convert.dtype: 'int8' is not one of" in capsys.readouterr().err


def test_command_line_only_arguments_reach_the_command(monkeypatch):
    seen = _capture(monkeypatch, "distill")
    assert cli.main(["distill", "--teacher", "t", "--out", "o", "--traces", "tr.jsonl", "--quiet",
                     "--max-new-tokens", "64"]) == 0
    assert seen["kwargs"] == {"teacher": "t", "student": None, "data": None, "heldout": None, "traces": "tr.jsonl",
                              "out": "o", "progress": False}
    assert seen["cfg"].distill.max_new_tokens == 64 and seen["cfg"].run.name == "tiny-cold-start"
    seen = _capture(monkeypatch, "plan")
    assert cli.main(["plan", "--nproc-per-node", "2", "--full", "--plan-json", "p.json", "train",
                     "--set", "parallel.tp=2", "--model", "m"]) == 0
    assert seen["cfg"].plan.nproc_per_node == 2 and seen["cfg"].plan.full
    kwargs = seen["kwargs"]
    assert kwargs["command"] == "train" and kwargs["plan_json"] == "p.json"
    assert kwargs["command_cfg"].parallel.tp == 2 and kwargs["command_cfg"].run.model == "m"
    seen = _capture(monkeypatch, "plan")
    assert cli.main(["plan", "convert", "--hf", "h", "--to-megatron", "o", "--tp", "2"]) == 0
    assert seen["kwargs"]["command_cfg"].parallel.tp == 2 and seen["kwargs"]["hf"] == "h"


def test_dry_run_prints_the_command_config(capsys):
    assert cli.main(["rm", "--out", "o", "--epochs", "2", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["rm"]["epochs"] == 2
    assert cli.main(["pipeline", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["pipeline"]["out"] == "runs/r1-pipeline"


def test_keys_lists_sections_aliases_and_flags(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in Config.keys():
        assert f"\n{key}  (" in out or out.startswith(f"{key}  (")
    assert "[sample] Rejection sampling" in out and "sample.max_tokens  (Optional[int], default None)" in out
    assert "run.eval_every -> eval.every" in out
    for command, flags in cli.FLAG_KEYS.items():
        for f in flags:
            assert f"  {command} {f.flag} -> {f.key}" in out


def test_defaults_are_todays():
    """The sections' defaults are the values the commands had before they read the config."""
    from r1mega.distill import DistillSettings, settings_from_config
    from r1mega.rejection import FilterSettings
    from r1mega.rejection.sample import filter_settings
    from r1mega.run.base_model import PretrainSpec, spec_from_config

    assert spec_from_config(Config()) == PretrainSpec()
    assert settings_from_config(get_recipe("tiny-cold-start")) == DistillSettings()
    assert filter_settings(Config()) == FilterSettings()
    s = Config().sample
    assert (s.samples, s.temperature, s.top_p, s.max_new_tokens) == (8, 0.7, 0.95, 1024)


def test_the_pipeline_stages_are_recipes():
    from r1mega import pipeline as P

    assert set(P.STAGE_RECIPES.values()) <= set(RECIPES)
    sample = get_recipe(P.STAGE_RECIPES["rejection_sampling"])
    assert (sample.sample.samples, sample.sample.max_per_prompt, sample.sample.max_new_tokens,
            sample.rewards.format_style) == (4, 1, 80, "summary")
    ablation = get_recipe(P.STAGE_RECIPES["reasoning_rl_no_language"])
    assert ablation.rewards.language_weight == 0.0
    assert ablation.with_values({"run.name": "x"}) == get_recipe("tiny-reasoning-rl").with_values(
        {"run.name": "x", "rewards.language_weight": 0.0})
    e = get_recipe(P.STAGE_RECIPES["eval"])
    assert (e.eval.new_tokens(e.rollout), e.rewards.format_style, e.eval.samples) == (96, "summary", 4)
    assert (P.HELDOUT_PROBLEMS, P.SAMPLE_PROMPTS, P.MIX_MATH_PROMPTS) == (100, 1200, 600)
