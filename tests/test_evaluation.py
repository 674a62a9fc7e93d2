"""r1mega.evaluation: pass@k and cons@k on hand-made cases (and pass@k against enumeration), bad
eval input in one line, and `r1mega eval` end to end (its greedy completions equal transformers'
own greedy generation)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from r1mega.evaluation import EvalError, cons_at_k, load_eval_problems, majority_index, paired_difference, pass_at_k
from r1mega.rewards import equivalent_answers


@pytest.mark.parametrize("n,c,k,want", [(4, 1, 1, 0.25), (5, 2, 2, 0.7), (3, 3, 2, 1.0), (6, 0, 3, 0.0),
                                        (4, 2, 3, 1.0), (16, 1, 4, 0.25)])
def test_pass_at_k_hand_cases(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want)


@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (7, 3, 4), (9, 1, 5), (6, 5, 1)])
def test_pass_at_k_equals_enumerating_every_k_subset(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


@pytest.mark.parametrize("args", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (True, 0, 1)])
def test_pass_at_k_refuses_bad_counts(args):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(*args)


def test_cons_at_k_hand_cases():
    same = lambda a, b: equivalent_answers(a, b)  # noqa: E731
    # the majority answer (5, twice) is wrong although one sample is right
    assert cons_at_k(["5", "5", "7"], [False, False, True], same) == 0.0
    # 1/2 and 0.5 are one answer by math-verify: it outvotes 3
    assert majority_index(["\\frac{1}{2}", "3", "0.5"], same) == 0
    assert cons_at_k(["\\frac{1}{2}", "3", "0.5"], [True, False, True], same) == 1.0
    # samples without an answer do not vote; a tie goes to the answer seen first
    assert majority_index([None, "4", None, "9"], same) == 1
    assert cons_at_k([None, None], [False, False], same) == 0.0
    assert majority_index(["9", "4", "4", "9"], same) == 0
    with pytest.raises(ValueError, match="2 answers but 1"):
        cons_at_k(["1", "2"], [True], same)


@pytest.mark.parametrize("n,seed", [(2, 0), (7, 1), (100, 2), (401, 3)])
def test_paired_difference_equals_numpy(n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(2, n))
    gap, se = paired_difference(a.tolist(), b.tolist())
    d = a - b
    assert gap == pytest.approx(d.mean(), abs=1e-12), seed
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(n), abs=1e-12), seed


def test_paired_difference_edges():
    assert paired_difference([1.0] * 5, [1.0] * 5) == (0.0, 0.0)
    gap, se = paired_difference([1.0, math.nan, 0.5], [0.5, 1.0, 0.5])  # the NaN pair is left out
    assert gap == 0.25 and se == pytest.approx(0.25)
    assert math.isnan(paired_difference([1.0], [0.0])[1]) and math.isnan(paired_difference([], [])[0])
    with pytest.raises(ValueError, match="3 scores against 2"):
        paired_difference([1.0, 1.0, 1.0], [1.0, 1.0])


@pytest.mark.parametrize("row,words", [
    ('{"id": "b", "prompt": "What is 2 + 2?", "task": "math"}', ("line 2", "'answer'")),
    ('{"id": "b", "prompt": "Write a poem.", "task": "general"}', ("id 'b'", "'task'")),
])
def test_eval_file_without_gold_answers_is_one_line(tmp_path, row, words):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"id": "a", "prompt": "What is 1 + 1?", "task": "math", "answer": "2"}\n' + row + "\n")
    with pytest.raises(EvalError) as err:
        load_eval_problems(bad)
    msg = str(err.value)
    assert "\n" not in msg and "problems.jsonl" in msg and all(w in msg for w in words), msg
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "eval", "--model", str(tmp_path), "--data", str(bad)],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words[0] in lines[0], proc.stderr


def test_r1mega_eval_end_to_end_and_greedy_equals_transformers(tmp_path, small_base_model):
    import torch
    import transformers

    from r1mega.data import base_corpus
    from r1mega.templates import r1_zero_prompt

    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "eval", "--model", str(small_base_model),
                           "--max-prompts", "3", "--samples", "3", "--max-new-tokens", "16", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pass@1" in proc.stdout and "cons@3" in proc.stdout, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert summary["problems"] == len(problems) == 3 and all(len(p["samples"]) == 3 for p in problems)
    mean_pass = sum(p["pass_at_1"] for p in problems) / 3
    assert math.isclose(summary["pass_at_1"], mean_pass), (summary["pass_at_1"], mean_pass)
    for p in problems:  # per problem, pass@1 is the samples' mean accuracy
        assert math.isclose(p["pass_at_1"], sum(s["accuracy"] for s in p["samples"]) / 3)

    tok = transformers.AutoTokenizer.from_pretrained(small_base_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(small_base_model, dtype=torch.float32).eval()
    for record, p in zip(base_corpus.problems("test", 3, seed=0), problems):
        assert p["id"] == record.id
        ids = tok(r1_zero_prompt(record.prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True)
        assert p["greedy"]["completion"] == text, (record.id, p["greedy"]["completion"], text)


def test_trainer_heldout_evaluation_equals_r1mega_eval(tmp_path, small_base_model):
    """The trainer's held-out evaluation of the base model (step 0) and `r1mega eval` of the same
    model with the run's own config.json: one evaluator, so every figure is the same number."""
    from tests.trainer_helpers import r1mega, train

    run = tmp_path / "runs" / "evaluated"
    train(tmp_path / "runs", "evaluated", small_base_model, "run.steps=1", "eval.greedy=true")
    step0 = json.loads((run / "eval.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0 and step0["prompts"] == 6 and step0["samples_per_prompt"] == 2, step0
    proc = r1mega("eval", "--model", str(small_base_model), "--config", str(run / "config.json"), "--quiet",
                  "--out", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["problems"] == 6 and summary["samples"] == 2 and summary["max_new_tokens"] == 24, summary
    for key in ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate", "mixing_rate",
                "response_length_mean"):
        assert step0[key] == summary[key], (key, step0[key], summary[key])


def test_eval_flags_are_aliases_of_config_keys(tmp_path, small_base_model):
    """`r1mega eval` runs what its flags say, a flag winning over --set (that each flag equals its
    key is test_cli_config's, in process; this is the command end to end)."""
    from tests.trainer_helpers import r1mega

    out = tmp_path / "eval"
    proc = r1mega("eval", "--model", str(small_base_model), "--quiet", "--out", str(out),
                  "--set", "eval.samples=5", "--set", "eval.greedy=true", "--samples", "2", "--max-prompts", "2",
                  "--no-greedy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert summary["samples"] == 2 and summary["greedy"] is False and summary["greedy_accuracy"] is None, summary
    assert len(rows) == 2 and all(len(r["samples"]) == 2 and r["greedy"] is None for r in rows), rows
    assert "(+ greedy)" not in proc.stdout and "2 problems x 2 samples" in proc.stdout, proc.stdout
