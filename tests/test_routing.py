"""R1's all-scenario RL stage: rule rewards for reasoning records, a reward model for general ones,
in one reward pool (RoutedRewards) and one GRPO run."""

from __future__ import annotations

import json

import pytest

from r1mega.data.records import PromptRecord
from r1mega.rewards import RewardModel, RewardPool
from r1mega.rewards.routing import RoutedRewards
from tests.test_reward_model import save_tiny_model
from tests.trainer_helpers import metrics, r1mega, train

MATH = PromptRecord(id="m", prompt="What is 2 + 3?", task="math", answer="5", language="en")
GENERAL = PromptRecord(id="g", prompt="hello", task="general", language="en")
COMPLETIONS = [" <think> 2+3=5 so </think> The final answer is $\\boxed{5}$.", "<think> hello </think> hello world",
               "hello world hello world", " <think> so </think> The final answer is $\\boxed{6}$."]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("routing_rm"), pad=True, chat_template=None)


def test_each_record_gets_its_own_reward(reward_model_dir):
    weights = {"accuracy": 1.0, "format_summary": 0.5, "language": 0.25}
    records = [MATH, GENERAL, GENERAL, MATH]
    rm = RewardModel(reward_model_dir)
    with RewardPool(weights, workers=1, options={"accuracy": {"skip_general": True}}) as pool, \
            RewardPool(weights, workers=1) as plain:
        routed = RoutedRewards(pool, rm, weight=2.0)
        assert routed.weights == {**weights, "reward_model": 2.0}
        scored = routed.score(records, COMPLETIONS)
        rules = plain.score([MATH, MATH], [COMPLETIONS[0], COMPLETIONS[3]])
    # reasoning records: exactly the rule rewards, no reward-model score
    for s, ref in zip((scored[0], scored[3]), rules):
        assert s.values["reward_model"] is None and not s.errors
        assert s.total == pytest.approx(ref.total) and s.values["accuracy"] == ref.values["accuracy"]
    assert scored[0].values["accuracy"] == 1.0 and scored[3].values["accuracy"] == 0.0
    # general records: accuracy skipped, format and language kept, plus weight x the model's own score
    expected = rm.score([GENERAL.prompt] * 2, COMPLETIONS[1:3])
    for s, value in zip(scored[1:3], expected):
        assert s.values["accuracy"] is None and not s.errors
        assert s.values["reward_model"] == pytest.approx(value)
        rules_part = 0.5 * s.values["format_summary"] + 0.25 * (s.values["language"] or 0.0)
        assert s.total == pytest.approx(rules_part + 2.0 * value)
    assert expected[0] != pytest.approx(expected[1])  # the model tells the two apart


def test_a_failing_reward_model_fails_its_samples_not_the_batch():
    class Broken:
        def score(self, prompts, completions):
            raise RuntimeError("out of memory")

    with RewardPool({"accuracy": 1.0}, workers=1, options={"accuracy": {"skip_general": True}}) as pool:
        scored = RoutedRewards(pool, Broken()).score([MATH, GENERAL], COMPLETIONS[:2])
    assert not scored[0].errors and scored[0].total == 1.0
    assert "out of memory" in scored[1].errors["reward_model"]


def _mixed_prompts(path):
    rows = [{"id": f"m{i}", "prompt": f"What is {i} + {i + 1}?", "task": "math", "answer": str(2 * i + 1),
             "language": "en"} for i in range(4)]
    rows += [{"id": f"g{i}", "prompt": f"Repeat the word cat {i + 2} times.", "task": "general", "language": "en"}
             for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def policy_reward_model(tmp_path_factory, small_base_model):
    """A sequence-classification model on the test base model's backbone, with a random head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("policy_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(small_base_model, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(small_base_model).save_pretrained(out)
    return out


def test_one_grpo_run_over_mixed_prompts(tmp_path, small_base_model, policy_reward_model):
    data = _mixed_prompts(tmp_path / "mixed.jsonl")
    train(tmp_path, "mixed", small_base_model, "run.steps=1", "batch.prompts_per_step=8", "grpo.group_size=2",
          f"run.data={data}", f"run.heldout={data}", "rewards.format_style=summary", "rewards.language_weight=1",
          f"rewards.reward_model={policy_reward_model}")
    row = metrics(tmp_path / "mixed")[0]
    assert row["reward_scored_frac"] == 1.0 and row["reward_errors"] == 0
    # every general sample got the model's score, every math sample its accuracy
    assert row["reward_reward_model"] == row["reward_reward_model"]  # not NaN
    assert 0.0 <= row["reward_accuracy"] <= 1.0


def test_general_prompts_without_a_reward_model_are_refused(tmp_path, small_base_model):
    data = _mixed_prompts(tmp_path / "mixed.jsonl")
    for sets, word in ((["--data", str(data)], "rewards.reward_model"),
                       (["--set", f"rewards.reward_model={tmp_path / 'none'}"], "rewards.reward_model")):
        proc = r1mega("train", "--quiet", "--model", str(small_base_model), "--set", f"run.out_dir={tmp_path}", *sets,
                      timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr[-2000:]
    assert "id 'g0'" in r1mega("train", "--quiet", "--model", str(small_base_model), "--data", str(data),
                                "--set", f"run.out_dir={tmp_path}", timeout=120).stderr
