"""`r1mega rm`: the Bradley-Terry loss and its gradient against a float64 hand computation, the
embedded default learning well above chance with RewardModel scoring exactly what the trainer
computed, and bad preference rows stopping the CLI with one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import r1mega


def test_bradley_terry_loss_and_gradient_match_a_float64_hand_computation(gen):
    from r1mega.rm import bradley_terry_loss

    B = 7  # odd: the mean's 1/B is not a power of two
    chosen = torch.randn(B, generator=gen) * 3
    rejected = torch.randn(B, generator=gen) * 3
    chosen[0], rejected[0] = 40.0, -5.0  # a large margin: softplus must not overflow either way
    chosen[1], rejected[1] = -30.0, 12.0
    c32, r32 = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = bradley_terry_loss(c32, r32)
    loss.backward()

    c, r = chosen.double().tolist(), rejected.double().tolist()
    import math

    def softplus(x: float) -> float:  # log(1 + e^x), written out
        return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))

    ref = sum(softplus(ri - ci) for ci, ri in zip(c, r)) / B
    grad_c = torch.tensor([-sigmoid(ri - ci) / B for ci, ri in zip(c, r)], dtype=torch.float64)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref) <= 2e-6 * abs(ref), (loss.item(), ref)
    torch.testing.assert_close(c32.grad.double(), grad_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r32.grad.double(), -grad_c, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="1-D of one shape"):
        bradley_terry_loss(c32[:3], r32[:4])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # As the CLI tests' processes run (tests/trainer_helpers.run_env): on a shared 2-core machine,
    # two torch threads competing with other work are several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default (the cached embedded base, the general prompts' pairs), 4 epochs."""
    from r1mega.rm import embedded_pairs, train_reward_model
    from r1mega.run.rundir import resolve_model

    train_pairs, heldout_pairs = embedded_pairs()
    _, base = resolve_model(None)
    out = tmp_path_factory.mktemp("rm") / "model"
    result = train_reward_model(base, train_pairs, heldout_pairs, out, epochs=4, lr=5e-4, batch_size=8,
                                max_length=4096, seed=0, progress=False)
    return out, heldout_pairs, result


def test_embedded_pairs_train_well_above_chance_and_reward_model_scores_what_was_trained(trained):
    from r1mega.rewards.reward_model import RewardModel

    out, heldout, result = trained
    m = result["metrics"]
    # measured over 52 held-out pairs: 0.40 before (the new head), 0.79 and 0.92 after epochs 1 and 2 on
    # one machine; 0.52 before, 0.60, 0.67, 0.88, 0.98 after epochs 1-4 on another (a base pretrained on
    # another CPU differs in its last bits): four epochs clear the bar on both
    assert m["heldout_acc"] >= 0.8, m
    assert m["epochs"][-1]["loss"] < m["epochs"][0]["loss"] < 0.693, m  # below log 2 (chance) and falling
    assert len(m["epochs"]) == 4 and m["epochs"][-1]["train_acc"] >= 0.8, m
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["heldout_acc"] == m["heldout_acc_before"]
    saved = json.loads((out / "rm.json").read_text())
    assert saved["metrics"] == m and saved["inputs"]["heldout_pairs"] == len(heldout) == 52
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # the temporary directory was renamed away

    rm = RewardModel(out, batch_size=5)  # another batching than the trainer's: scores must not depend on it
    prompts = [p["prompt"] for p in heldout]
    scores = rm.score(prompts + prompts, [p["chosen"] for p in heldout] + [p["rejected"] for p in heldout])
    expected = result["heldout_scores"]["chosen"] + result["heldout_scores"]["rejected"]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=0, atol=1e-5)
    n = len(heldout)
    assert sum(c > r for c, r in zip(scores[:n], scores[n:])) / n == m["heldout_acc"]


def test_pair_tokens_are_reward_models_with_and_without_a_chat_template(trained, tmp_path):
    import transformers

    from r1mega.rewards.reward_model import RewardModel
    from r1mega.rm import PairTokens
    from r1mega.run.base_model import with_chat_template

    out, heldout, _ = trained
    for path in (out, with_chat_template(out, tmp_path / "chat")):
        rm = RewardModel(path)
        mine = PairTokens(transformers.AutoTokenizer.from_pretrained(path))
        assert mine.use_chat_template == rm.use_chat_template == (path != out)
        for p in heldout[:4]:
            assert mine.token_ids(p["prompt"], p["chosen"]) == rm.token_ids(p["prompt"], p["chosen"])


def test_cli_trains_on_a_pair_file_and_prints_the_table(tmp_path):
    from r1mega.rm import embedded_pairs

    train_pairs, heldout_pairs = embedded_pairs()
    data, heldout = tmp_path / "pairs.jsonl", tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in train_pairs[:24]))
    heldout.write_text("".join(json.dumps(p) + "\n" for p in heldout_pairs[:6]))
    proc = r1mega("rm", "--data", str(data), "--heldout", str(heldout), "--out", str(tmp_path / "rm"),
                  "--epochs", "1", "--batch-size", "12", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout and "wall time" in proc.stdout, proc.stdout
    saved = json.loads((tmp_path / "rm" / "rm.json").read_text())
    assert saved["inputs"]["data"] == str(data) and saved["settings"]["batch_size"] == 12
    assert saved["inputs"]["train_pairs"] == 24 and saved["inputs"]["heldout_pairs"] == 6


GOOD = {"prompt": "Say hello in English.", "chosen": "<think>\nx\n</think>\n\nHello",
        "rejected": "<think>\nx\n</think>\n\n你好"}
BAD_ROWS = [
    ({"prompt": "Say hello in English.", "chosen": "Hello"}, "line 2: field 'rejected': missing"),
    ({**GOOD, "chosen": ""}, "line 2: field 'chosen': empty"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=["no-rejected", "empty-chosen"])
@pytest.mark.parametrize("flag", ["--data", "--heldout"])
def test_a_bad_pair_stops_the_cli_with_one_line_before_any_work(tmp_path, row, message, flag):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    proc = r1mega("rm", flag, str(path), "--out", str(tmp_path / "rm"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"r1mega: error: {path}: {message}"), proc.stderr
    assert not (tmp_path / "rm").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


@pytest.mark.parametrize("row,message", [
    *BAD_ROWS,
    ({**GOOD, "rejected": GOOD["chosen"]}, "line 2: field 'rejected': the same text as 'chosen'"),
    ({**GOOD, "prompt": 3}, "line 2: field 'prompt': expected a string, got int"),
    ({**GOOD, "id": "a"}, "line 2: field 'id': duplicate 'a' (first at line 1)"),
    ("not an object", "line 2: expected an object, got str"),
])
def test_load_preference_pairs_names_file_row_and_field(tmp_path, row, message):
    from r1mega.data import DataError
    from r1mega.rm import load_preference_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**GOOD, "id": "a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_preference_pairs(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value), str(err.value)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": 7, "family": "greet"}) + "\n")
    assert load_preference_pairs(path) == [{**GOOD, "id": "row-0"}, {**GOOD, "id": "7", "family": "greet"}]
    with pytest.raises(DataError, match="no such file"):
        load_preference_pairs(tmp_path / "missing.jsonl")
