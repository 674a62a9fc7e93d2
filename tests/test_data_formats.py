"""Published datasets load as they are (data.format): GSM8K, MATH-500, AIME 24/25, AMC 23, HumanEval
and MBPP from rows copied byte for byte from their public files (tests/data/published/SOURCES.md);
APPS, TACO, DeepScaleR and OpenR1-Math from rows written to their published schema
(tests/data/schema/README.md). Each adapter's gold answers or tests are checked against what we did
not write: the published reference answers and solutions score 1 through the rewards (math-verify,
the sandbox), and off-by-one answers or broken programs score 0."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from r1mega.data import FORMATS, DataError, fit_prompts, load_prompts, prompt_lengths
from r1mega.rewards import math_accuracy
from r1mega.rewards.code import code_reward
from r1mega.rewards.sandbox import available_backends
from r1mega.utils.latex import last_boxed

DATA = Path(__file__).parent / "data"
PUBLISHED, SCHEMA = DATA / "published", DATA / "schema"
sandboxed = pytest.mark.skipif(not available_backends(), reason="no sandbox backend works here")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _boxed(answer: str) -> str:
    return f"<think>done</think> <answer>\\boxed{{{answer}}}</answer>"


def test_gsm8k_published_test_rows():
    records = load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8k")
    rows = _rows(PUBLISHED / "gsm8k_test.jsonl")
    assert [r.id for r in records] == [str(i) for i in range(len(rows))]  # no id column: the row index
    assert records[0].prompt == rows[0]["question"] and records[0].task == "math"
    assert [r.answer for r in records] == ["18", "3", "70000", "540", "20", "64"]
    assert records[0].meta["solution"].endswith("$<<9*2=18>>18 every day at the farmer\u2019s market.")
    for record in records:
        assert math_accuracy(_boxed(record.answer), record.answer) == 1.0
        assert math_accuracy(_boxed(str(int(record.answer) + 1)), record.answer) == 0.0


def test_math500_published_test_rows():
    records = load_prompts(PUBLISHED / "math500_test.jsonl", format="math")
    rows = _rows(PUBLISHED / "math500_test.jsonl")
    assert [r.id for r in records] == [row["unique_id"] for row in rows]
    assert records[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert records[0].meta["subject"] == "Precalculus" and records[0].meta["level"] == 2
    for record, row in zip(records, rows):
        # the published solution's own final box is the gold answer (math-verify decides)
        assert math_accuracy(_boxed(last_boxed(row["solution"])), record.answer) == 1.0
    assert math_accuracy(_boxed("\\frac{14}{5}"), records[2].answer) == 0.0


def test_math_rows_without_an_answer_take_the_solution_s_last_box(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in _rows(PUBLISHED / "math500_test.jsonl")]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with_answer = load_prompts(PUBLISHED / "math500_test.jsonl", format="math")
    boxed = load_prompts(path, format="math")
    for a, b in zip(with_answer, boxed):
        assert math_accuracy(_boxed(b.answer), a.answer) == 1.0


@pytest.mark.parametrize("name, fmt, ids, answers", [
    ("aime24.jsonl", "aime", ["60", "61", "62"], ["204", "113", "371"]),
    ("amc23.jsonl", "amc", ["0", "1", "2"], ["27", "36", "45"]),  # published as floats 27.0, ...
    ("aime25.jsonl", "aime", ["0", "1"], ["70", "588"]),  # published as integers
])
def test_competition_rows(name, fmt, ids, answers):
    records = load_prompts(PUBLISHED / name, format=fmt)
    assert [r.id for r in records] == ids and [r.answer for r in records] == answers
    rows = _rows(PUBLISHED / name)
    assert records[0].prompt == rows[0]["problem"]
    for record in records:
        assert math_accuracy(_boxed(record.answer), record.answer) == 1.0
        assert math_accuracy(_boxed(str(int(record.answer) - 1)), record.answer) == 0.0


@pytest.mark.parametrize("name, fmt", [("deepscaler.jsonl", "deepscaler"), ("openr1_math.jsonl", "openr1-math")])
def test_deepscaler_and_openr1_math_rows(name, fmt):
    records = load_prompts(SCHEMA / name, format=fmt)
    rows = _rows(SCHEMA / name)
    for record, row in zip(records, rows):
        assert record.prompt == row["problem"] and record.task == "math"
        assert math_accuracy(_boxed(last_boxed(row["solution"])), record.answer) == 1.0
    if fmt == "openr1-math":
        assert records[0].id == rows[0]["uuid"] and records[1].answer == "4"  # an empty answer: the last box
        assert records[0].meta["generations"] == rows[0]["generations"]  # extra columns reach meta


def _program(code: str) -> str:
    return f"<think>x</think><answer>```python\n{code}\n```</answer>"


@sandboxed
def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    records = load_prompts(PUBLISHED / "humaneval.jsonl", format="humaneval")
    rows = _rows(PUBLISHED / "humaneval.jsonl")
    assert [r.id for r in records] == [row["task_id"] for row in rows]
    for record, row in zip(records, rows):
        assert record.task == "code" and row["prompt"].strip() in record.prompt
        assert code_reward(_program(row["prompt"] + row["canonical_solution"]), record.tests) == 1.0, record.id
        assert code_reward(_program(row["prompt"] + "    return None\n"), record.tests) == 0.0, record.id


@sandboxed
def test_mbpp_reference_code_passes_its_asserts():
    records = load_prompts(PUBLISHED / "mbpp.jsonl", format="mbpp")
    rows = _rows(PUBLISHED / "mbpp.jsonl")
    assert [r.id for r in records] == [str(row["task_id"]) for row in rows]
    for record, row in zip(records, rows):
        assert len(record.tests) == len(row["test_list"]) and row["test_list"][0] in record.prompt
        assert code_reward(_program(row["code"].replace("\r\n", "\n")), record.tests) == 1.0, record.id
        assert code_reward(_program("pass"), record.tests) == 0.0, record.id


# a program with the right names and wrong answers, for every APPS/TACO row here
WRONG = ("print(-1)\ndef max_gap(*args):\n    return -1\nclass Solution:\n    def countVowels(self, *args):\n"
         "        return -1\n")


@sandboxed
@pytest.mark.parametrize("name, fmt", [("apps.jsonl", "apps"), ("taco.jsonl", "taco")])
def test_apps_and_taco_solutions_pass_their_cases(name, fmt):
    records = load_prompts(SCHEMA / name, format=fmt)
    rows = _rows(SCHEMA / name)
    kinds = set()
    for record, row in zip(records, rows):
        kinds |= {next(iter(t)) for t in record.tests}
        solution = json.loads(row["solutions"])[0]
        assert code_reward(_program(solution), record.tests) == 1.0, record.id
        assert code_reward(_program(WRONG), record.tests) == 0.0, record.id
    assert kinds == {"input", "assert"}  # stdin/stdout and call-based (fn_name) cases


def test_verl_preprocessed_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(SCHEMA / "verl.jsonl")
    records = load_prompts(SCHEMA / "verl.jsonl", format="verl")
    assert [r.id for r in records] == ["0", "1"] and [r.answer for r in records] == ["64", "36"]
    assert records[0].prompt == rows[0]["prompt"][-1]["content"] and records[0].meta["data_source"] == "math_dapo"
    for record in records:
        assert math_accuracy(_boxed(record.answer), record.answer) == 1.0
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "train.parquet")  # as verl writes them
    assert load_prompts(tmp_path / "train.parquet", format="verl") == records[:1]
    bad = tmp_path / "code.jsonl"
    bad.write_text(json.dumps(dict(rows[0], ability="code")) + "\n")
    with pytest.raises(DataError, match="line 1: field 'ability': 'code': data.format verl reads math rows"):
        load_prompts(bad, format="verl")


def test_the_config_offers_every_format():
    import typing

    from r1mega.config import DataConfig

    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == FORMATS


def test_every_format_is_tested_here():
    tested = {"gsm8k", "math", "aime", "amc", "deepscaler", "openr1-math", "humaneval", "mbpp", "apps", "taco", "r1mega",
              "verl"}
    assert set(FORMATS) == tested


def test_column_keys_and_ids_from_the_row_index(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "1+1?", "final": "2", "src": "a"}\n{"q": "2+2?", "final": 4}\n')
    records = load_prompts(path, prompt_key="q", answer_key="final", task="math")
    assert [(r.id, r.prompt, r.answer, r.task) for r in records] == [("0", "1+1?", "2", "math"), ("1", "2+2?", "4", "math")]
    assert records[0].meta == {"src": "a"}
    keyed = load_prompts(path, prompt_key="q", answer_key="final", id_key="final", task="math")
    assert [r.id for r in keyed] == ["2", "4"]
    with pytest.raises(DataError, match=r"mine.jsonl: line 1: field 'question': missing \(data.prompt_key"):
        load_prompts(path, prompt_key="question", task="math")


@pytest.mark.parametrize("fmt, row, message", [
    ("gsm8k", {"question": "q", "answer": "no final line"}, "field 'answer': no '#### <answer>' line"),
    ("gsm8k", {"answer": "#### 3"}, "field 'question': missing"),
    ("math", {"problem": "p", "solution": "no box"}, "field 'solution': no \\\\boxed{} answer"),
    ("amc", {"question": "q", "answer": True}, "field 'answer': must be a number or a string, got bool"),
    ("humaneval", {"task_id": "H/0", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f()"},
     "field 'entry_point': 'f\\(\\)' is not a function name"),
    ("mbpp", {"task_id": 1, "text": "t", "test_list": []}, "field 'test_list': must be a non-empty list"),
    ("apps", {"question": "q", "input_output": ""}, "field 'input_output': empty"),
    ("apps", {"question": "q", "input_output": '{"inputs": ["1"], "outputs": []}'}, "1 inputs and 0 outputs"),
])
def test_a_bad_published_row_is_one_line_naming_file_row_and_field(tmp_path, fmt, row, message):
    path = tmp_path / "data.jsonl"
    good = _rows(PUBLISHED / "gsm8k_test.jsonl")[0] if fmt == "gsm8k" else None
    path.write_text((json.dumps(good) + "\n" if good else "") + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_prompts(path, format=fmt)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: line {2 if good else 1}: ")
    assert re.search(message, text), text


def test_an_unknown_format_names_the_choices():
    with pytest.raises(DataError, match="data.format: 'gsm8K' is not one of .*did you mean 'gsm8k'"):
        load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8K")


def test_gzip_parquet_shards_and_json_arrays_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(PUBLISHED / "math500_test.jsonl")
    expected = load_prompts(PUBLISHED / "math500_test.jsonl", format="math")
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress((PUBLISHED / "math500_test.jsonl").read_bytes()))
    (tmp_path / "m.json").write_text(json.dumps(rows))
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), shards / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), shards / "test-00001-of-00002.parquet")
    for source in (tmp_path / "m.jsonl.gz", tmp_path / "m.json", shards):
        assert load_prompts(source, format="math") == expected, source
    # a bad row in the second shard is named by the shard and its row
    bad = [dict(rows[4], problem=None), rows[5]]
    pq.write_table(pa.Table.from_pylist(bad), shards / "test-00001-of-00002.parquet")
    with pytest.raises(DataError, match=r"shards: test-00001-of-00002.parquet: row 0 \(0-based\): field 'problem'"):
        load_prompts(shards, format="math")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="a directory without data files"):
        load_prompts(empty)


def test_datasets_save_to_disk_directories(tmp_path):
    datasets = pytest.importorskip("datasets")  # a dependency of r1mega: this only names it
    rows = _rows(PUBLISHED / "gsm8k_test.jsonl")
    expected = load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8k")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_prompts(tmp_path / "one", format="gsm8k") == expected
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                                 "test": datasets.Dataset.from_list(rows)})
    both.save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(tmp_path / "dict", format="gsm8k", split="test") == expected
    with pytest.raises(DataError, match=r"dict: the saved DatasetDict has several splits \(splits: train, test\); "
                                        "set data.split"):
        load_prompts(tmp_path / "dict", format="gsm8k")
    with pytest.raises(DataError, match="has no split 'valid'"):
        load_prompts(tmp_path / "dict", format="gsm8k", split="valid")
    with pytest.raises(DataError, match="data.split 'test' is for a saved DatasetDict"):
        load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8k", split="test")


# ---- prompts against the budget (r1mega.data.fit_prompts) -------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from r1mega.models.tokenizer import build_tokenizer

    texts = [r["question"] for r in _rows(PUBLISHED / "gsm8k_test.jsonl")]
    return build_tokenizer(texts * 4, vocab_size=300)


def test_fit_prompts_filter_leaves_the_long_ones_out_and_says_how_many(tokenizer, capsys):
    import io

    records = load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8k")
    lengths = prompt_lengths(records, tokenizer, "raw")
    assert lengths == [len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in records]
    limit = sorted(lengths)[3]
    log = io.StringIO()
    kept = fit_prompts(records, tokenizer, "raw", max_prompt_tokens=limit, new_tokens=8, max_positions=10_000,
                       overlong="filter", source="gsm8k_test.jsonl", log=log)
    assert [r.id for r in kept] == [r.id for r, n in zip(records, lengths) if n <= limit]
    assert log.getvalue() == (f"gsm8k_test.jsonl: left out {len(records) - len(kept)} of {len(records)} prompts "
                              f"longer than {limit} tokens (the longest: {max(lengths)}; data.overlong_prompts=filter)\n")
    # the model's positions bound the prompt too: prompt + new tokens must fit
    kept = fit_prompts(records, tokenizer, "raw", max_prompt_tokens=10_000, new_tokens=100, max_positions=limit + 100,
                       overlong="filter", log=io.StringIO())
    assert len(kept) == sum(n <= limit for n in lengths)


def test_fit_prompts_error_names_the_first_offender_and_the_knobs(tokenizer):
    records = load_prompts(PUBLISHED / "gsm8k_test.jsonl", format="gsm8k")
    lengths = prompt_lengths(records, tokenizer, "raw")
    first = next(i for i, n in enumerate(lengths) if n > min(lengths))
    with pytest.raises(DataError) as info:
        fit_prompts(records, tokenizer, "raw", max_prompt_tokens=min(lengths), new_tokens=8, max_positions=10_000,
                    source="gsm8k_test.jsonl")
    assert str(info.value) == (
        f"gsm8k_test.jsonl: prompt {records[first].id!r}: {lengths[first]} tokens > rollout.max_prompt_tokens "
        f"{min(lengths)}; raise rollout.max_prompt_tokens, or set data.overlong_prompts=filter to leave such prompts "
        f"out ({sum(n > min(lengths) for n in lengths)} of {len(records)} are too long)")
    with pytest.raises(DataError, match="positions .*lower eval.max_new_tokens"):
        fit_prompts(records, tokenizer, "raw", max_prompt_tokens=10_000, new_tokens=100, max_positions=max(lengths) + 50,
                    new_tokens_key="eval.max_new_tokens")
    with pytest.raises(DataError, match="eval.max_new_tokens 64 leaves no room for a prompt in the model's 64 positions"):
        fit_prompts(records, tokenizer, "raw", max_prompt_tokens=10, new_tokens=64, max_positions=64,
                    new_tokens_key="eval.max_new_tokens")
    with pytest.raises(DataError, match="every prompt is too long"):
        fit_prompts(records, tokenizer, "raw", max_prompt_tokens=1, new_tokens=8, max_positions=10_000, overlong="filter")
