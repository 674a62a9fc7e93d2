"""Rejection sampling: the repetition check against a brute-force reference, every rejection
reason, per-prompt selection (dedup, limit, order, judge verdicts), and `r1mega sample` end to end
(rows with provenance, a report whose counts add up, bad input in one line)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from r1mega.rejection import FilterSettings, rejection_reason, runaway_repetition, select
from tests.trainer_helpers import run_env


def brute_force_repetition(text: str, max_repeats: int, max_span_words: int) -> bool:
    words = text.split()
    for span in range(1, max_span_words + 1):
        for i in range(len(words)):
            block = words[i:i + span]
            if len(block) == span and all(words[i + k * span:i + (k + 1) * span] == block for k in range(max_repeats)):
                return True
    return False


@pytest.mark.parametrize("text,want", [("a b a b a b a b", True), ("a b a b a b", False),
                                       ("x y z x y z x y z x y z end", True), ("the cat sat on the mat", False),
                                       ("<think> 0+0=0 0+0=0 </think> <answer> 0 </answer>", False),
                                       ("so so so so", True), ("", False)])
def test_runaway_repetition_hand_cases(text, want):
    assert runaway_repetition(text, max_repeats=4) is want


def test_runaway_repetition_equals_brute_force():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(400):
        vocab = rng.choice([["a", "b"], ["a", "b", "c"], list("abcdef")])
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 30))]
        if rng.random() < 0.3 and words:  # plant a loop
            span = words[:rng.randint(1, 4)]
            at = rng.randint(0, len(words))
            words[at:at] = span * rng.randint(2, 5)
        text, repeats, span_max = " ".join(words), rng.randint(2, 5), rng.randint(1, 6)
        assert runaway_repetition(text, max_repeats=repeats, max_span_words=span_max) == \
            brute_force_repetition(text, repeats, span_max), (seed, text, repeats, span_max)


def sample(**kw):
    base = {"sample_index": 0, "completion": "<think> 3+4=7 </think> <answer> 7 </answer>", "tokens": 12,
            "finish_reason": "stop", "accuracy": 1.0, "format": 1.0, "language": None}
    return {**base, **kw}


@pytest.mark.parametrize("kw,want", [
    ({}, None), ({"accuracy": None}, "unscored"), ({"accuracy": 0.0}, "wrong"), ({"format": 0.0}, "format"),
    ({"language": 0.5}, "language"), ({"language": 0.97}, None),
    ({"completion": "<think> again again again again </think> <answer> 7 </answer>"}, "repetition"),
    ({"finish_reason": "length"}, "truncated"), ({"tokens": 500}, "too long"),
])
def test_every_rejection_reason(kw, want):
    assert rejection_reason(sample(**kw), FilterSettings(max_tokens=100)) == want


def test_judge_verdict_replaces_accuracy():
    settings = FilterSettings()
    assert rejection_reason(sample(accuracy=None), settings, judged=True) is None
    assert rejection_reason(sample(accuracy=1.0), settings, judged=False) == "wrong"


def test_select_dedups_limits_and_keeps_order():
    a, b, c = "<think> 1 </think> <answer> 1 </answer>", "<think> 2 </think> <answer> 1 </answer>", \
        "<think> 3 </think> <answer> 1 </answer>"
    samples = [sample(completion=a), sample(completion=" " + a.replace(" ", "  ")), sample(accuracy=0.0),
               sample(completion=b), sample(completion=c)]
    kept, reasons = select(samples, FilterSettings(max_per_prompt=2))
    assert kept == [0, 3] and reasons == [None, "duplicate", "wrong", None, "over limit"]


def greedy_answer(model_dir, prompt: str, max_new_tokens: int) -> str:
    """transformers' greedy completion's final answer: the barely pretrained test base is never
    right, so the test's gold answer is what it says (then the rule verifies its samples)."""
    import torch
    import transformers

    from r1mega.rewards import extract_final_answer
    from r1mega.templates import r1_zero_prompt

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(r1_zero_prompt(prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    answer, _ = extract_final_answer(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert answer is not None, "the test base's greedy completion has no <answer>"
    return answer


def test_r1mega_sample_end_to_end_with_a_judge(tmp_path, small_base_model):
    gold = greedy_answer(small_base_model, "What is 12 + 30?", 48)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"id": "m1", "prompt": "What is 12 + 30?", "task": "math", "answer": gold}) + "\n"
                    '{"id": "g1", "prompt": "What is 12 + 30?", "task": "general"}\n')
    out = tmp_path / "sft.jsonl"
    # near-greedy sampling: the samples agree with the greedy answer, and repeat each other
    cmd = [sys.executable, "-m", "r1mega.cli", "sample", "--model", str(small_base_model), "--data", str(data),
           "--out", str(out), "--samples", "4", "--max-per-prompt", "2", "--max-new-tokens", "48", "--quiet",
           "--temperature", "0.01", "--judge", "tests.rewards_custom:judge_has_digit"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "sft.jsonl.report.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["kept"] == len(rows) and {r["task"] for r in rows} == {"math", "general"}, report
    assert report["tasks"]["math"]["rejected"].get("duplicate", 0) >= 1, report
    for task, t in report["tasks"].items():  # every sample is kept or has one reason
        assert t["prompts"] == 1 and t["samples"] == 4 and t["kept"] + sum(t["rejected"].values()) == 4, (task, t)
        assert t["kept"] <= 2
    for row in rows:
        assert {"id", "prompt", "completion", "task", "provenance"} <= set(row)
        assert row["provenance"]["source"] == str(small_base_model) and row["provenance"]["prompt_id"] in ("m1", "g1")
        assert row["provenance"]["rewards"]["format"] == 1.0
        if row["task"] == "math":
            assert row["provenance"]["rewards"]["accuracy"] == 1.0
    print(proc.stdout)

    # bad input: a general prompt without a judge, a judge that does not import
    for extra, word in ((["--data", str(data)], "'general'"),
                        (["--data", str(data), "--judge", "no_such_module:f"], "--judge")):
        proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "sample", "--model", str(small_base_model),
                               "--out", str(tmp_path / "x.jsonl"), *extra], capture_output=True, text=True,
                              env=run_env(), timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
