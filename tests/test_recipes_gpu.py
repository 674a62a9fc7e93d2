"""The GPU recipes for real bases (r1mega.recipes: r1-zero-qwen2.5-7b, r1-zero-qwen3-30b-a3b), validated
on CPU as a user would before a cluster job: ``--dry-run`` resolves and checks the config, and
``r1mega plan`` lays it out on one node and on four nodes of 8 GPUs against the bases' config.json
(tests/data/model_configs: the published architectures; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.recipes import RECIPES, get_recipe
from tests.trainer_helpers import r1mega

CONFIGS = Path(__file__).parent / "data" / "model_configs"
GSM8K = Path(__file__).parent / "data" / "published" / "gsm8k_test.jsonl"
RECIPE_MODELS = [("r1-zero-qwen2.5-7b", "qwen2.5-7b"), ("r1-zero-qwen3-30b-a3b", "qwen3-30b-a3b-base")]


@pytest.mark.parametrize("name, model", RECIPE_MODELS)
def test_the_recipe_dry_runs_with_a_published_dataset(name, model):
    proc = r1mega("train", "--recipe", name, "--model", str(CONFIGS / model), "--data", str(GSM8K), "--format", "gsm8k",
                  "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["run"]["name"] == name and cfg["data"]["format"] == "gsm8k"
    assert cfg["rollout"]["engine"] == "vllm" and cfg["grpo"]["kl_coef"] == 0.0


@pytest.mark.parametrize("nnodes", [1, 4])
@pytest.mark.parametrize("name, model", RECIPE_MODELS)
def test_the_recipe_plans_on_one_node_and_on_four(name, model, nnodes):
    proc = r1mega("plan", "--nnodes", str(nnodes), "--nproc-per-node", "8", "train", "--recipe", name, "--model",
                  str(CONFIGS / model), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"plan: {nnodes} node(s) x 8 process(es) = {8 * nnodes} ranks" in out, out
    assert "fits the layout" in out, out
    cfg = get_recipe(name)
    dp = 8 * nnodes // (cfg.parallel.tp * cfg.parallel.pp)
    assert f"dp {dp}" in out, out


def test_each_recipe_setting_cites_its_source():
    for name, _ in RECIPE_MODELS:
        doc = RECIPES[name].__doc__
        for cited in ("optim.lr", "grpo.group_size", "batch.prompts_per_step", "grpo.eps_high", "KL",
                      "rollout.max_new_tokens"):
            assert cited in doc, (name, cited)
        assert "@" in doc  # a repository at a commit
