"""r1mega.data.loader: JSONL/JSON/Parquet loading, one-line errors naming file/row/field, round trips."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1mega.data import DataError, PromptRecord, load_prompts, write_prompts

GOOD = {"id": "g1", "prompt": "What is 1 + 1?", "task": "math", "answer": "2"}
CODE = {"id": "c1", "prompt": "Print the sum.", "task": "code",
        "tests": [{"input": "1 2\n", "output": "3"}, {"assert": "assert f(1) == 2"}]}


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_fields_meta_and_defaults(tmp_path):
    rows = [
        GOOD,
        "",  # blank lines are skipped
        dict(CODE, language="zh", source="apps", meta={"difficulty": 3}),
        {"id": 7, "prompt": "Say hi.", "extra": [1, 2]},  # int id, default task, extra field
        {"id": "cd", "prompt": "Reach 10.", "task": "countdown", "answer": 10, "numbers": [2, 5]},
    ]
    records = load_prompts(write_lines(tmp_path / "d.jsonl", rows), task="general")
    assert records[0] == PromptRecord(id="g1", prompt="What is 1 + 1?", task="math", answer="2")
    assert records[1].tests == ({"input": "1 2\n", "output": "3"}, {"assert": "assert f(1) == 2"})
    assert records[1].language == "zh"
    assert records[1].meta == {"difficulty": 3, "source": "apps"}
    assert records[2] == PromptRecord(id="7", prompt="Say hi.", task="general", meta={"extra": [1, 2]})
    assert records[3].answer == "10" and records[3].meta == {"numbers": [2, 5]}


def test_row_task_wins_over_default(tmp_path):
    (record,) = load_prompts(write_lines(tmp_path / "d.jsonl", [GOOD]), task="general")
    assert record.task == "math"


BAD_ROWS = [
    ('{"id": "x", "prompt": ', "line 2: invalid JSON: "),
    ([1, 2], "line 2: expected an object, got list"),
    ({"id": " ", "prompt": "p", "task": "general"}, "line 2: field 'id': empty"),
    ({"id": "x", "prompt": "  \n", "task": "general"}, "line 2: field 'prompt': empty"),
    ({"id": "x", "prompt": 5, "task": "general"}, "line 2: field 'prompt': must be a string, got int"),
    ({"id": "x", "prompt": "p"}, "line 2: field 'task': missing"),
    ({"id": "x", "prompt": "p", "task": "mathh"},
     "line 2: field 'task': 'mathh' is not one of 'math', 'code', 'countdown', 'general' "
     "(did you mean 'math'?)"),
    ({"id": "x", "prompt": "p", "task": "math"},
     "line 2: field 'answer': missing (required for task 'math')"),
    ({"id": "x", "prompt": "p", "task": "math", "answer": ""},
     "line 2: field 'answer': empty (required for task 'math')"),
    ({"id": "x", "prompt": "p", "task": "math", "answer": 0.5},
     "line 2: field 'answer': must be a string, got float 0.5"),
    ({"id": "x", "prompt": "p", "task": "code"}, "line 2: field 'tests': missing (required for task 'code')"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": []}, "line 2: field 'tests': empty"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": "assert f()"},
     "line 2: field 'tests': must be a list of test objects, got str"),
    ({"id": "x", "prompt": "p", "task": "code",
      "tests": [{"input": "1", "output": "1"}, {"input": "2"}, {"assert": "assert 1"}]},
     "line 2: field 'tests': item 2 of 3 must have 'input' and 'output' strings or an 'assert' string"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1", "output": 1}]},
     "line 2: field 'tests': item 1 of 1 must have 'input' and 'output' strings or an 'assert' string"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1", "expected": "1"}]},
     "line 2: field 'tests': item 1 of 1: unknown key 'expected'"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": ["assert 1"]},
     "line 2: field 'tests': item 1 of 1 must be an object, got str"),
    ({"id": "x", "prompt": "p", "task": "general", "language": "english"},
     "line 2: field 'language': 'english' is not a known language code"),
    ({"id": "x", "prompt": "p", "task": "countdown", "answer": "10"},
     "line 2: field 'numbers': missing (required for task 'countdown')"),
    ({"id": "x", "prompt": "p", "task": "countdown", "answer": "10", "numbers": [1, "2"]},
     "line 2: field 'numbers': must be a non-empty list of integers"),
    ({"id": "x", "prompt": "p", "task": "countdown", "answer": "ten", "numbers": [1, 2]},
     "line 2: field 'answer': 'ten' is not an integer"),
    ({"id": "x", "prompt": "p", "task": "general", "meta": "m"},
     "line 2: field 'meta': must be an object, got str"),
    ({"id": "x", "prompt": "p", "task": "general", "src": 1, "meta": {"src": 2}},
     "line 2: field 'src': given both at top level and inside 'meta'"),
    (dict(GOOD), "line 2: field 'id': duplicate 'g1' (first at line 1)"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(": ", 1)[1][:40] for _, m in BAD_ROWS])
def test_malformed_row_is_one_line_naming_file_row_field(tmp_path, row, message):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, row])
    with pytest.raises(DataError) as info:
        load_prompts(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {message}"), text


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", "", {"id": "x", "prompt": "p", "task": "math"}])
    with pytest.raises(DataError, match=r"d\.jsonl: line 4: field 'answer'"):
        load_prompts(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        load_prompts(write_lines(tmp_path / "d.csv", [GOOD]))
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_prompts(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="task='mathh' is not one of"):
        load_prompts(write_lines(tmp_path / "d.jsonl", [GOOD]), task="mathh")
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_prompts(tmp_path / "bad.parquet")


def test_bom_and_json_array_and_gzip(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_prompts(tmp_path / "bom.jsonl")[0].id == "g1"
    (tmp_path / "arr.json").write_text(json.dumps([GOOD, CODE]))
    assert [r.id for r in load_prompts(tmp_path / "arr.json")] == ["g1", "c1"]
    (tmp_path / "arr_bad.json").write_text(json.dumps([GOOD, {"id": "c2", "prompt": "p", "task": "code"}]))
    with pytest.raises(DataError, match=r"arr_bad\.json: row 1 \(0-based\): field 'tests': missing"):
        load_prompts(tmp_path / "arr_bad.json")
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(CODE) + "\n")
    assert len(load_prompts(tmp_path / "lines.json")) == 2
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode()))
    assert load_prompts(tmp_path / "z.jsonl.gz")[0].answer == "2"


def _records():
    return [
        PromptRecord(id="m1", prompt="What is $\\frac{1}{2} + \\frac{1}{2}$?", task="math", answer="1",
                     language="en", meta={"source": "hand", "level": 2, "tags": ["easy"], "id": "shadow"}),
        PromptRecord(id="c1", prompt="两数之和", task="code", language="zh",
                     tests=({"input": "1 2\n", "output": "3"}, {"assert": "assert add(1, 2) == 3"})),
        PromptRecord(id="k1", prompt="Reach 24.", task="countdown", answer="24",
                     meta={"numbers": [3, 8, 1], "solution": "3 * 8 * 1"}),
        PromptRecord(id="g1", prompt="Write a haiku.", task="general"),
    ]


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_prompts_round_trips_exactly(tmp_path, name):
    records = _records()
    assert write_prompts(tmp_path / name, records) == len(records)
    assert load_prompts(tmp_path / name) == records


def test_write_prompts_refuses_what_would_not_survive(tmp_path):
    path = tmp_path / "out.jsonl"
    write_prompts(path, _records())
    before = path.read_bytes()
    bad = [
        (PromptRecord(id="a", prompt="p", task="general", meta={"t": (1, 2)}),
         "field 'meta': does not survive"),
        (PromptRecord(id="a", prompt="p", task="general", meta={"s": {1}}),
         "field 'meta': not JSON-serialisable"),
        (PromptRecord(id="a", prompt="p", task="code", tests=({"assert": {"x"}},)),
         "field 'tests': not JSON-serialisable"),
        (PromptRecord(id="a", prompt="p", task="code", tests=[{"assert": "assert 1"}]),
         "field 'tests': does not survive"),
        (PromptRecord(id="a", prompt="p", task="math", answer=2), "field 'answer': does not survive"),
        (PromptRecord(id="a", prompt="p", task="math"), "field 'answer': missing"),
        (PromptRecord(id="a", prompt="p", task="nope"), "field 'task': 'nope' is not one of"),
    ]
    for record, message in bad:
        with pytest.raises(DataError) as info:
            write_prompts(path, [_records()[0], record])
        assert str(info.value).startswith(f"{path}: record 1 (0-based, id 'a'): {message}"), str(info.value)
    with pytest.raises(DataError, match="record 1 .*field 'id': duplicate"):
        write_prompts(path, [_records()[0], _records()[0]])
    with pytest.raises(DataError, match="no records to write"):
        write_prompts(path, [])
    with pytest.raises(DataError, match="writes JSON Lines"):
        write_prompts(tmp_path / "out.parquet", _records())
    assert path.read_bytes() == before  # nothing was half-written


def test_parquet_round_trip_and_row_numbers(tmp_path):
    rows = [
        {"id": "m1", "prompt": "1 + 1?", "task": "math", "answer": "2", "tests": None, "language": "en",
         "source": "s1"},
        {"id": "c1", "prompt": "Add.", "task": "code", "answer": None,
         "tests": [{"input": "1 2\n", "output": "3", "assert": None},  # Parquet structs: all keys
                   {"input": None, "output": None, "assert": "assert add(1, 2) == 3"}],
         "language": None, "source": "s2"},
        {"id": "k1", "prompt": "Reach 6.", "task": "countdown", "answer": "6", "tests": None,
         "language": None, "source": "s3", "numbers": [1, 2, 3]},
    ]
    for row in rows[:2]:
        row["numbers"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records = load_prompts(tmp_path / "d.parquet")
    assert records[0] == PromptRecord(id="m1", prompt="1 + 1?", task="math", answer="2", language="en",
                                      meta={"source": "s1"})  # null extra columns are absent
    assert records[1].tests == ({"input": "1 2\n", "output": "3"}, {"assert": "assert add(1, 2) == 3"})
    assert records[2].meta == {"source": "s3", "numbers": [1, 2, 3]}
    # A default task for files without a task column, and 0-based row numbers in errors.
    table = pa.Table.from_pylist([{"id": i, "prompt": f"q{i}", "answer": str(i)} for i in range(3)]
                                 + [{"id": 3, "prompt": "q3", "answer": None}])
    pq.write_table(table, tmp_path / "math.parquet")
    with pytest.raises(DataError) as info:
        load_prompts(tmp_path / "math.parquet", task="math")
    assert str(info.value) == (f"{tmp_path / 'math.parquet'}: row 3 (0-based): field 'answer': "
                               "missing (required for task 'math')")
    assert [r.id for r in load_prompts(tmp_path / "math.parquet", task="general")] == ["0", "1", "2", "3"]
