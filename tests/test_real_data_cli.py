"""Published files through the real CLI, as a user has them: `r1mega train` and `r1mega eval` on
GSM8K's and MATH-500's test files and HumanEval with only ``--data FILE --set data.format=NAME``
(plus budgets that fit the small test base: 1024 positions), and overlong prompts handled when the
data loads: filtered with a count, or refused in one line before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.rewards.sandbox import available_backends
from tests.trainer_helpers import r1mega

PUBLISHED = Path(__file__).parent / "data" / "published"
# budgets for the test base (1024 positions): its prompts are 137-753 tokens under the R1-Zero template
FIT = ["rollout.max_prompt_tokens=640", "rollout.max_new_tokens=16", "data.overlong_prompts=filter"]
SMALL = ["run.steps=1", "batch.prompts_per_step=2", "grpo.group_size=2", "eval.samples=1", "eval.max_prompts=2",
         "run.save_every=0", "rewards.workers=1", "run.samples_per_step=1"]
CASES = [
    pytest.param("gsm8k_test.jsonl", "gsm8k", 6, id="gsm8k"),
    pytest.param("math500_test.jsonl", "math", 5, id="math500"),  # one 753-token prompt is left out
    pytest.param("humaneval.jsonl", "humaneval", 4, id="humaneval", marks=pytest.mark.skipif(
        not available_backends(), reason="code is scored in a sandbox; no backend works here")),
]


def _sets(*sets: str) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("name, fmt, fitting", CASES)
def test_a_published_file_trains_and_evaluates_with_only_its_format_named(tmp_path, small_base_model, name, fmt,
                                                                         fitting):
    data = PUBLISHED / name
    proc = r1mega("train", "--quiet", "--model", str(small_base_model), "--data", str(data), "--heldout", str(data),
                  *_sets(f"data.format={fmt}", *FIT, *SMALL, f"run.out_dir={tmp_path}", "run.name=run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    left_out = 6 - fitting if fmt != "humaneval" else 0
    if left_out:
        assert f"{data}: left out {left_out} of 6 prompts longer than 640 tokens" in proc.stderr, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 0
    heldout = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    published = [json.loads(line) for line in data.read_text().splitlines()]
    id_column = {"gsm8k": None, "math": "unique_id", "humaneval": "task_id"}[fmt]  # GSM8K has none: the row index
    expected_ids = [str(i) if id_column is None else row[id_column] for i, row in enumerate(published)]
    assert [r["id"] for r in heldout] == expected_ids[:2]  # eval.max_prompts=2

    out = tmp_path / "eval"
    proc = r1mega("eval", "--quiet", "--model", str(tmp_path / "run" / "final"), "--data", str(data), "--samples", "2",
                  "--out", str(out), *_sets(f"data.format={fmt}", *FIT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == fitting and summary["samples"] == 2, summary
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert all(p["task"] == ("code" if fmt == "humaneval" else "math") for p in problems)


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_overlong_prompts_stop_every_command_in_one_line_before_any_model_is_built(tmp_path, small_base_model,
                                                                                   command):
    data = PUBLISHED / "gsm8k_test.jsonl"
    args = {"train": ["--model", str(small_base_model), "--data", str(data), *_sets(f"run.out_dir={tmp_path}")],
            "eval": ["--model", str(small_base_model), "--data", str(data)],
            "sample": ["--model", str(small_base_model), "--data", str(data), "--out", str(tmp_path / "kept.jsonl"),
                       "--max-new-tokens", "64"]}
    proc = r1mega(command, *args[command], *_sets("data.format=gsm8k", "rollout.max_prompt_tokens=200"), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"r1mega: error: {data}: prompt '0': 317 tokens > rollout.max_prompt_tokens 200; raise "
                        "rollout.max_prompt_tokens, or set data.overlong_prompts=filter to leave such prompts out "
                        "(4 of 6 are too long)"), lines[0]
    assert "resume" not in proc.stderr and not (tmp_path / "r1mega").exists() and not (tmp_path / "kept.jsonl").exists()


def test_a_benchmark_preset_sits_under_set_and_the_flags():
    from r1mega import cli

    def config(*args: str):
        return cli.command_config(cli._parser().parse_args(["eval", "--model", "m", "--data", "aime24.jsonl", *args]))

    preset = config("--benchmark", "aime24")
    assert (preset.data.format, preset.eval.samples, preset.eval.temperature, preset.eval.top_p,
            preset.eval.max_new_tokens) == ("aime", 64, 0.6, 0.95, 32768)
    assert config("--benchmark", "aime24", "--set", "eval.samples=8").eval.samples == 8
    assert config("--benchmark", "aime24", "--set", "eval.samples=8", "--samples", "2").eval.samples == 2
    assert config().data.format == "r1mega"
    with pytest.raises(cli.ConfigError, match="--benchmark math500: give --data FILE"):
        cli.command_config(cli._parser().parse_args(["eval", "--model", "m", "--benchmark", "math500"]))


def test_r1mega_eval_benchmark_math500_on_the_published_file(tmp_path, small_base_model):
    data = PUBLISHED / "math500_test.jsonl"
    proc = r1mega("eval", "--benchmark", "math500", "--model", str(small_base_model), "--data", str(data), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [
        f"r1mega: error: {data}: eval.max_new_tokens 32768 leaves no room for a prompt in the model's 1024 "
        "positions: lower eval.max_new_tokens"], proc.stderr  # R1's 32k budget does not fit the test base

    out = tmp_path / "eval"
    proc = r1mega("eval", "--benchmark", "math500", "--model", str(small_base_model), "--data", str(data),
                  "--max-new-tokens", "8", "--samples", "2", "--quiet", "--out", str(out),
                  *_sets("rollout.max_prompt_tokens=900"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by subject:" in proc.stdout and "by level:" in proc.stdout, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "math500" and summary["samples"] == 2 and summary["temperature"] == 0.6
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for field in ("subject", "level"):
        groups = summary["breakdown"][field]
        assert sum(g["problems"] for g in groups.values()) == len(rows)
        assert set(groups) == {str(row[field]) for row in rows}
