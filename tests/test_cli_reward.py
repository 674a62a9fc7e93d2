"""`r1mega synth` and `r1mega reward`: the trainer's reward path over files, and bad input."""

import json

import pytest

from r1mega.cli import main
from r1mega.data import DataError, load_completions, load_prompts


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def arithmetic(tmp_path):
    data, sol = tmp_path / "arith.jsonl", tmp_path / "sol.jsonl"
    assert main(["synth", "arithmetic", "--out", str(data), "--solutions", str(sol), "--n", "12",
                 "--difficulty", "3", "--seed", "5"]) == 0
    return data, sol


@pytest.mark.parametrize("task, style", [("arithmetic", "r1-zero"), ("countdown", "r1-zero"), ("arithmetic", "r1")])
def test_shipped_solutions_score_full_accuracy(tmp_path, capsys, task, style):
    data, sol, out = tmp_path / "d.jsonl", tmp_path / "s.jsonl", tmp_path / "scores.jsonl"
    assert main(["synth", task, "--out", str(data), "--solutions", str(sol), "--n", "10",
                 "--difficulty", "2", "--style", style]) == 0
    fmt = "answer-tags" if style == "r1-zero" else "summary"
    assert main(["reward", "--data", str(data), "--completions", str(sol), "--out", str(out),
                 "--set", "rewards.workers=1", "--set", f"rewards.format_style={fmt}"]) == 0
    scores = _rows(out)
    assert len(scores) == 10 and all(s["values"]["accuracy"] == 1.0 for s in scores)
    assert all(s["total"] == 2.0 and not s["errors"] for s in scores)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "1.0000" in printed and "completions/s" in printed


def test_wrong_answers_score_zero_and_ids_keep_file_order(arithmetic, tmp_path):
    data, sol = arithmetic
    completions = _rows(sol)
    completions[1]["completion"] = completions[1]["completion"].replace("<answer>", "<answer> 7 +")
    completions.append(dict(completions[0]))  # a second completion of the same prompt (a group)
    _write(sol, completions)
    out = tmp_path / "scores.jsonl"
    assert main(["reward", "--data", str(data), "--completions", str(sol), "--out", str(out),
                 "--set", "rewards.workers=1"]) == 0
    scores = _rows(out)
    assert [s["id"] for s in scores] == [c["id"] for c in completions]
    assert scores[1]["values"]["accuracy"] == 0.0 and scores[0]["values"]["accuracy"] == 1.0
    assert scores[-1] == scores[0]


@pytest.mark.parametrize("corrupt, message", [
    (lambda rows: rows[3].pop("prompt"), "line 4: field 'prompt': missing"),
    (lambda rows: rows[2].update(answer="\\frac{"), "field 'answer': gold answer '\\\\frac{' cannot be parsed"),
    (lambda rows: rows[5].update(task="maths"), "line 6: field 'task'"),
])
def test_malformed_data_is_one_line_naming_file_row_and_field(arithmetic, capsys, corrupt, message):
    data, sol = arithmetic
    rows = _rows(data)
    corrupt(rows)
    _write(data, rows)
    assert main(["reward", "--data", str(data), "--completions", str(sol)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(data) in err and message in err, err


@pytest.mark.parametrize("corrupt, message", [
    (lambda rows: rows[1].update(id="nope"), "line 2: field 'id': 'nope' is not a prompt of the dataset"),
    (lambda rows: rows[0].update(completion=None), "line 1: field 'completion': must be a string, got null"),
    (lambda rows: rows[4].pop("completion"), "line 5: field 'completion': missing"),
])
def test_malformed_completions_name_file_row_and_field(arithmetic, corrupt, message):
    data, sol = arithmetic
    rows = _rows(sol)
    corrupt(rows)
    _write(sol, rows)
    with pytest.raises(DataError, match=rf"^{sol}: {message}"):
        load_completions(sol, load_prompts(data))
