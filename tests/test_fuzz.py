"""Bad input, fuzzed (issue 11, item 5): the loaders of everything a user hands r1mega.

Property tests (hypothesis, fixed budgets, derandomized) over

* the prompt loader the trainer uses (r1mega.data.load_prompts),
* the SFT and preference-pair loaders (r1mega.sft.data.load_sft_data, r1mega.rm.load_preference_pairs,
  both on r1mega.data.read_checked_rows),
* the config parser behind ``r1mega train --config FILE --set KEY=VALUE`` (r1mega.cli.resolve_config),
* the Hugging Face checkpoint reader: config.json (r1mega.models.describe_hf_model) and the
  safetensors headers and index (r1mega.models.check_hf_checkpoint).

Inputs start from a valid file and are broken one way each: truncated at a random byte, invalid
UTF-8 bytes written in, a field set to a wrong type, a huge value, NaN or Infinity, a field removed
or an unknown one added, a row replaced by deeply nested JSON, the whole file emptied. Property:
every case ends in a successful load (of finite, typed values) or in the project's clean error
(DataError, ConfigError, UnsupportedModelError, CheckpointError: the types `r1mega` prints as one
line) whose message is one line naming the file, and the row and the field where there is one;
never another exception, never a hang (each load runs under an alarm).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import math
import re
import signal
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from r1mega.cli import resolve_config
from r1mega.config import Config, ConfigError
from r1mega.data import DataError, PromptRecord, load_prompts
from r1mega.models.hf_config import UnsupportedModelError, describe_hf_config, describe_hf_model
from r1mega.recipes import get_recipe
from r1mega.rm import load_preference_pairs
from r1mega.sft.data import SFTExample, load_sft_data
from tests.models_fixtures import CONFIGS, DEEPSEEK_YARN


def fuzz(max_examples: int):
    """The settings of every property here: a fixed budget, the same examples on every run."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# A message may quote a bad value, shortened: a huge value must not make a huge message.
MAX_MESSAGE = 600
HANG_S = 10


class Hang(AssertionError):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S):
    def alarm(*_):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call, error: type[Exception], named: Path | None) -> tuple[Any, str | None]:
    """(result, None) or (None, message) of `call`; any exception but `error` fails the test, as
    does a message of more than one line, a huge one, or one that does not start with the file
    `named` (or a file in that directory)."""
    with no_hang():
        try:
            return call(), None
        except error as err:
            msg = str(err)
    assert len(msg.splitlines()) == 1 and msg.isprintable(), repr(msg)
    if named is not None:
        assert re.match(re.escape(str(named)) + r"[:/ ]", msg), msg
    assert len(msg) <= len(str(named or "")) + MAX_MESSAGE, f"{len(msg)} characters: {msg[:300]!r}..."
    return None, msg


# ---- hostile JSON ---------------------------------------------------------------------------
DEEP = 100_000
HOSTILE = [
    "NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400", "-0.0", "0", "-1", "1.5", "2",
    "9" * 5000,  # more digits than Python converts to an int by default (4300)
    "9" * 4000, "18446744073709551616", "-9223372036854775809",
    "true", "false", "null", '""', '" "', "[]", "{}", "[null]", "[{}]", "[[]]", "[1, 2]", '["a"]',
    '"\\ud800"', '"\\u0000"', '"a\\nb\\rc"', '"\\u2028\\u0085"', '"F32"', '"silu"', '"yarn"',
    json.dumps("x" * 100_000), json.dumps("é" * 2000), json.dumps(["y" * 1000] * 100),
    "[" * DEEP + "]" * DEEP, '{"a": ' * DEEP + "1" + "}" * DEEP,
    "[" * 900 + "]" * 900, "[" * 980 + "]" * 980, "[" * 2000 + "]" * 2000,
    json.dumps(list(range(5000))), json.dumps({str(i): i for i in range(500)}),
    '{"input": 1, "output": []}', '{"assert": ""}', '{"role": "assistant", "content": 5}',
    '{"role": ["assistant"], "content": "x"}', '{"rope_type": "yarn", "rope_theta": "x"}',
]
_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
raw_json = st.sampled_from(HOSTILE) | json_values.map(json.dumps)  # json.dumps writes NaN and Infinity
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
             b"\xf4\x90\x80\x80", b"\x00", b"\xef\xbb\xbf", b"\r", b"\n"]


def json_with(value: Any, path: tuple, raw: str) -> str:
    """JSON text of `value` with the element at `path` replaced by the JSON text `raw` (added,
    with its parents, where absent; a path that does not fit replaces the value it reaches)."""
    if not path:
        return raw
    key, rest = path[0], path[1:]
    if isinstance(value, dict) and isinstance(key, str):
        parts = [f"{json.dumps(k)}: {json_with(v, rest, raw) if k == key else json.dumps(v)}"
                 for k, v in value.items()]
        if key not in value:
            parts.append(f"{json.dumps(key)}: {json_with({}, rest, raw)}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list) and isinstance(key, int) and value:
        i = key % len(value)
        return "[" + ", ".join(json_with(v, rest, raw) if j == i else json.dumps(v)
                               for j, v in enumerate(value)) + "]"
    return raw


def without(value: Any, path: tuple) -> Any:
    value = copy.deepcopy(value)
    parent = value
    for key in path[:-1]:
        if isinstance(parent, dict) and key in parent:
            parent = parent[key]
        elif isinstance(parent, list) and isinstance(key, int) and parent:
            parent = parent[key % len(parent)]
        else:
            return value
    last = path[-1]
    if isinstance(parent, dict):
        parent.pop(last, None)
    elif isinstance(parent, list) and isinstance(last, int) and parent:
        del parent[last % len(parent)]
    return value


def byte_mutations():
    """Mutations of a file's bytes: (kind, position, payload); position is taken modulo the size."""
    position = st.integers(min_value=0, max_value=2**20)
    return st.one_of(
        st.tuples(st.just("truncate"), position, st.just(b"")),
        st.tuples(st.just("replace"), position, st.sampled_from(BAD_BYTES)),
        st.tuples(st.just("insert"), position, st.sampled_from(BAD_BYTES)),
        st.tuples(st.just("flip"), position, st.integers(0, 255).map(lambda b: bytes([b]))),
    )


def apply_bytes(data: bytes, mutation: tuple, lo: int = 0, hi: int | None = None) -> bytes:
    """`mutation` applied at a position in data[lo:hi]."""
    kind, position, payload = mutation
    hi = len(data) if hi is None else hi
    at = lo + position % max(1, hi - lo + (kind in ("truncate", "insert")))
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + payload + data[at:]
    if kind == "replace":
        return data[:at] + payload + data[at + len(payload):]
    if at >= len(data):
        return data
    return data[:at] + bytes([data[at] ^ (payload[0] or 1)]) + data[at + 1:]


WHOLE_FILES = [b"", b"\n", b"\n\n  \n", b"\xef\xbb\xbf", b"   ", b"[]", b"{}", b"null", b"[null]", b"0",
               b"\xff\xfe", b"[" * DEEP, b"[" * DEEP + b"]" * DEEP, b'{"a": ' * DEEP, b"\x1f\x8b\x08\x00"]


# ---- the row loaders ------------------------------------------------------------------------
PROMPT_ROWS = [
    {"prompt": "What is 2 + 3?", "task": "math", "answer": "5"},
    {"prompt": "Sum the two numbers on stdin.", "task": "code", "tests": [{"input": "1 2\n", "output": "3\n"}]},
    {"prompt": "Define f(x) = x + 1.", "task": "code", "tests": [{"assert": "assert f(1) == 2"}], "language": "en"},
    {"prompt": "Reach 24 with 3 3 8 8.", "task": "countdown", "answer": "24", "numbers": [3, 3, 8, 8]},
    {"prompt": "写一首关于秋天的诗。", "task": "general", "language": "zh"},
    {"prompt": "Explain GRPO.", "task": "general", "meta": {"source": "hand"}, "difficulty": 3},
]
SFT_ROWS = [
    {"prompt": "2 + 3?", "completion": "<think>\n2 + 3 = 5\n</think>\n\n5"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                  {"role": "assistant", "content": "5"}]},
    {"prompt": "你好", "completion": "你好！", "language": "zh"},
]
PAIR_ROWS = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "family": "math"},
]
LOADERS = {
    # name: (load, rows, whether every row needs an id, the fields worth breaking, result type)
    "prompts": (load_prompts, PROMPT_ROWS, True,
                [("id",), ("prompt",), ("task",), ("answer",), ("tests",), ("tests", 0), ("tests", 0, "input"),
                 ("tests", 0, "output"), ("tests", 0, "assert"), ("language",), ("meta",), ("numbers",),
                 ("numbers", 0)], PromptRecord),
    "sft": (load_sft_data, SFT_ROWS, False,
            [("id",), ("prompt",), ("completion",), ("messages",), ("messages", 0), ("messages", 2, "role"),
             ("messages", 2, "content"), ("messages", 1, "content")], SFTExample),
    "pairs": (load_preference_pairs, PAIR_ROWS, False,
              [("id",), ("prompt",), ("chosen",), ("rejected",)], dict),
}
ROW_WHERE = re.compile(r"(line \d+|row \d+ \(0-based\)): (.*)")
NAMES_WHAT = re.compile(r"field '|expected an object|has both|invalid JSON|not valid UTF-8|not a readable")


@dataclass(frozen=True)
class RowFile:
    """How to write a dataset of a loader's valid rows, and how to break it (`damage`):
    ("row", kind, row, field, raw) breaks one row (see `row_mutations`), ("bytes", mutation,
    on the compressed bytes) the file's bytes, ("whole", bytes) replaces the file, ("none",)."""

    picks: tuple[int, ...] = (0,)  # a valid row template per row (modulo their number)
    ids: tuple[str, ...] = ("str",) * 4  # per row: "str", "int" or "none" (no id where optional)
    ascii: bool = True
    newline: str = "\n"
    damage: tuple = ("none",)


def row_mutations():
    """(kind, row, field index, raw JSON): a field set to `raw`, dropped, an unknown field added
    (named by `raw` there), or the whole row replaced by `raw`."""
    index = st.integers(min_value=0, max_value=99)
    return st.one_of(
        st.tuples(st.just("set"), index, index, raw_json),
        st.tuples(st.just("drop"), index, index, st.just("")),
        st.tuples(st.just("extra"), index, st.text(min_size=1, max_size=8), raw_json),
        st.tuples(st.just("row"), index, st.just(0), raw_json),
    )


row_files = st.builds(
    RowFile, picks=st.lists(st.integers(0, 99), min_size=1, max_size=4).map(tuple),
    ids=st.lists(st.sampled_from(["str", "int", "none"]), min_size=4, max_size=4).map(tuple),
    ascii=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]),
    damage=st.one_of(row_mutations().map(lambda m: ("row", *m)), row_mutations().map(lambda m: ("row", *m)),
                     st.tuples(st.just("bytes"), byte_mutations(), st.booleans()),
                     st.tuples(st.just("whole"), st.sampled_from(WHOLE_FILES)), st.just(("none",))))


def write_rows(spec: RowFile, loader: str, fmt: str) -> tuple[bytes, int | None]:
    """(file bytes, index of the broken row or None) of `spec` for `loader` in format `fmt`."""
    _, templates, needs_id, fields, _ = LOADERS[loader]
    rows = []
    for i, t in enumerate(spec.picks):
        style = spec.ids[i % len(spec.ids)]
        row = {} if style == "none" and not needs_id else {"id": i if style == "int" else f"p-{i}"}
        rows.append({**row, **templates[t % len(templates)]})
    texts = [json.dumps(r, ensure_ascii=spec.ascii) for r in rows]
    broken = None
    damage = spec.damage
    if damage[0] == "row":
        _, what, i, field, raw = damage
        broken = i % len(rows)
        if what == "drop":
            texts[broken] = json.dumps(without(rows[broken], fields[field % len(fields)]))
        elif what == "row":
            texts[broken] = raw
        else:
            path = (field,) if what == "extra" else fields[field % len(fields)]
            texts[broken] = json_with(rows[broken], path, raw)
    if fmt in (".json", ".json.gz"):
        data = ("[\n" + ",\n".join(texts) + "\n]\n").encode()
    else:
        data = "".join(t + spec.newline for t in texts).encode()
    compressed = fmt.endswith(".gz")
    if damage[0] == "bytes":
        if compressed and damage[2]:
            return apply_bytes(gzip.compress(data, mtime=0), damage[1]), None
        data = apply_bytes(data, damage[1])
    elif damage[0] == "whole":
        data = damage[1]
    return (gzip.compress(data, mtime=0) if compressed else data), broken


def check_row_error(msg: str, path: Path, where: str | None) -> None:
    """After the file: the row (the broken one, when one was), then what in it is wrong."""
    rest = msg[len(str(path)) + 2:]
    m = ROW_WHERE.match(rest)
    if m is None:
        return  # about the whole file: unreadable, empty, not JSON
    assert NAMES_WHAT.search(m.group(2)), msg
    if where is not None and "duplicate" not in msg and not m.group(2).startswith(("invalid JSON", "not valid UTF-8")):
        assert m.group(1) == where, msg


def where_of(fmt: str, broken: int | None) -> str | None:
    if broken is None:
        return None
    return f"line {broken + 1}" if fmt in (".jsonl", ".jsonl.gz") else f"row {broken} (0-based)"


@pytest.mark.parametrize("fmt", [".jsonl", ".json", ".jsonl.gz"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
@fuzz(400)
@given(spec=row_files)
@example(spec=RowFile(damage=("row", "row", 0, 0, "[" * DEEP + "]" * DEEP)))  # RecursionError
@example(spec=RowFile(damage=("row", "set", 0, 0, "9" * 5000)))  # ValueError: more digits than int() takes
@example(spec=RowFile(damage=("bytes", ("truncate", 30, b""), True)))  # gzip: EOFError
@example(spec=RowFile(damage=("bytes", ("flip", 0, b"\x01"), True)))  # gzip: BadGzipFile
@example(spec=RowFile(damage=("row", "row", 0, 0, "[null]")))  # .jsonl read as a JSON array: "row 0"
@example(spec=RowFile(damage=("row", "set", 0, 2, json.dumps("x" * 100_000))))  # a 100 kB message (a task)
@example(spec=RowFile(damage=("row", "row", 0, 0, "\n".join([json.dumps({"id": "x" * 100_000, **PAIR_ROWS[0],
                                                                       **PROMPT_ROWS[0], **SFT_ROWS[0]})] * 2))))
# ^ two rows with the same 100 kB id: a 200 kB message
@example(spec=RowFile(picks=(1,), damage=("row", "set", 0, 5, json.dumps("x" * 100_000))))  # SFT: a 100 kB role
def test_row_loaders_load_or_name_file_row_and_field(loader, fmt, spec):
    load, _, _, _, result_type = LOADERS[loader]
    content, broken = write_rows(spec, loader, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{fmt}"
        path.write_bytes(content)
        result, msg = outcome(lambda: load(path), DataError, path)
    if msg is None:
        assert all(isinstance(r, result_type) for r in result) and 1 <= len(result)
    else:
        check_row_error(msg, path, where_of(fmt, broken))


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_unbroken_files_load(loader, tmp_path):
    load, templates, _, _, _ = LOADERS[loader]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", **t}) + "\n" for i, t in enumerate(templates)))
    assert len(load(path)) == len(templates)


# Parquet: typed columns, so a column is broken (every row), or the file's bytes are.
def _parquet_columns():
    import pyarrow as pa

    n = 3
    return [pa.array([1, 2, 3]), pa.array([1.5, math.nan, math.inf]), pa.nulls(n), pa.array([[1], [], None]),
            pa.array([b"\xff\xfe", b"x", b""]), pa.array([{"a": 1}, {"a": None}, None]),
            pa.array(["", " ", "\n"]), pa.array(["x" * 100_000] * n), pa.array([True, False, True]),
            pa.array([[{"input": 1, "output": "2"}], [{"assert": ""}], []]),
            pa.array([[{"role": "user", "content": "hi"}], [{"role": "assistant", "content": None}], None]),
            pa.array([["a", "b"], ["c"], []])]


@pytest.mark.parametrize("loader", sorted(LOADERS))
@fuzz(200)
@example(template=0, column=None, mutation=("replace", 3, b"\xfe\xff"))  # a page's thrift header: OSError
@example(template=1, column=None, mutation=("replace", 7555, b"\xff"))  # a column name: UnicodeDecodeError
@given(template=st.integers(0, 5), column=st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(0, 11))),
       mutation=st.none() | byte_mutations())
def test_parquet_rows_load_or_name_file_row_and_field(loader, template, column, mutation):
    import pyarrow as pa
    import pyarrow.parquet as pq

    load, templates, _, fields, result_type = LOADERS[loader]
    rows = [{"id": f"p-{i}", **templates[template % len(templates)]} for i in range(3)]
    table = pa.table({k: pa.array([r.get(k) for r in rows]) for k in {k: 0 for r in rows for k in r}})
    if column is not None:
        name = fields[column[0] % len(fields)][0]
        values = _parquet_columns()[column[1]]
        table = (table.set_column(table.schema.get_field_index(name), name, values) if name in table.column_names
                 else table.append_column(name, values))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        pq.write_table(table, path)
        if mutation is not None:
            path.write_bytes(apply_bytes(path.read_bytes(), mutation))
        result, msg = outcome(lambda: load(path), DataError, path)
    if msg is None:
        assert all(isinstance(r, result_type) for r in result)
    else:
        check_row_error(msg, path, None)


# ---- the config parser ----------------------------------------------------------------------
BASE_CONFIG = get_recipe("tiny").to_dict()
CONFIG_KEYS = [tuple(k.split(".")) for k in Config.keys()]
OVERRIDE_VALUES = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999", "1e-400", "9" * 5000, "9" * 4000,
                   "0x10", "1_000", " 3 ", "+3", "-0", "None", "none", "null", "", " ", "true", "yes", "2.5",
                   "١٢", "x" * 100_000, "a\nb", "\x00", "é", "[1]", "{}", "=", "r1mega.rewards:format_reward"]


def finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a (nested) value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def broken_json(draw, base: dict, kind: str, set_paths, drop_paths, extra_paths) -> bytes:
    """`base` as JSON text broken one way (`kind`): the value at a path of `set_paths` set to
    hostile JSON ("set"), one of `drop_paths` removed ("drop"), one of `extra_paths` added
    ("extra"), a byte mutation ("bytes"), or another whole file ("whole")."""
    if kind == "set":
        text = json_with(base, draw(set_paths), draw(raw_json))
    elif kind == "drop":
        text = json.dumps(without(base, draw(drop_paths)))
    elif kind == "extra":
        text = json_with(base, draw(extra_paths), draw(raw_json))
    else:
        text = json.dumps(base, indent=2)
    if kind == "bytes":
        return apply_bytes(text.encode(), draw(byte_mutations()))
    return draw(st.sampled_from(WHOLE_FILES)) if kind == "whole" else text.encode()


@st.composite
def config_files(draw):
    """The bytes of a config.json (the tiny recipe's, saved) broken once."""
    kind = draw(st.sampled_from(["set", "set", "set", "drop", "extra", "bytes", "whole"]))
    return broken_json(draw, BASE_CONFIG, kind,
                       st.sampled_from(CONFIG_KEYS) | st.sampled_from([("run",), ("grpo",), ("optim", "lr", "x")]),
                       st.sampled_from(CONFIG_KEYS + [("run",), ("sft",)]),
                       st.tuples(st.sampled_from(["run", "grpo", "nope", "", "run.steps"]), st.text(max_size=8)))


def _names_a_key(msg: str) -> bool:
    return any(f"{'.'.join(k)}:" in msg or f"'{'.'.join(k)}'" in msg for k in CONFIG_KEYS) or \
        bool(re.search(r"unknown (key|section)|section '.*' must be an object|expected an object|cannot read|parallel:",
                       msg))


def _config_with(path: tuple, raw: str) -> bytes:
    return json_with(BASE_CONFIG, path, raw).encode()


@fuzz(1000)
@given(content=config_files())
@example(content=b"[" * DEEP)  # RecursionError
@example(content=b"\xff" + json.dumps(BASE_CONFIG).encode())  # UnicodeDecodeError
@example(content=_config_with(("run", "seed"), "9" * 5000))  # ValueError: more digits than int() takes
@example(content=_config_with(("optim", "lr"), "9" * 4000))  # OverflowError: int too large for a float
@example(content=_config_with(("optim", "lr"), "Infinity"))  # accepted: an infinite learning rate
@example(content=_config_with(("rewards", "timeout_s"), "1e999"))  # accepted: no reward deadline
@example(content=_config_with(("run", "name"), "[" * 980 + "]" * 980))  # a 2 kB message
def test_config_file_loads_or_names_file_and_key(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_bytes(content)
        cfg, msg = outcome(lambda: resolve_config("tiny", str(path), []), ConfigError, path)
    if msg is None:
        assert isinstance(cfg, Config) and finite(cfg.to_dict()), cfg.to_dict()
    else:
        assert _names_a_key(msg), msg


@fuzz(1000)
@given(key=st.sampled_from(Config.keys()) | st.text(max_size=20),
       sep=st.sampled_from(["=", "=", " = ", ":", ""]),
       value=st.sampled_from(OVERRIDE_VALUES) | st.text(max_size=10))
@example(key="optim.lr", sep="=", value="inf")  # accepted: an infinite learning rate
@example(key="run.seed", sep="=", value="9" * 5000)  # a 5 kB message
def test_config_overrides_parse_or_name_the_key(key, sep, value):
    text = f"{key}{sep}{value}"
    cfg, msg = outcome(lambda: resolve_config("tiny", None, [text]), ConfigError, None)
    if msg is None:
        assert isinstance(cfg, Config) and finite(cfg.to_dict()), cfg.to_dict()
    else:
        named = text.partition("=")[0].strip()
        assert msg.startswith("--set ") or named in msg or repr(named)[1:30] in msg, msg


@pytest.mark.parametrize("content, args", [
    (b"[" * DEEP, []), (b"\xff{}", []), (b'{"optim": {"lr": Infinity}}', []), (b"{}", ["--set", "optim.lr=inf"]),
    (b'{"run": {"seed": ' + b"9" * 5000 + b"}}", []),
])
def test_cli_prints_one_line_and_exits_2_on_a_bad_config(content, args, tmp_path, capsys):
    from r1mega.cli import main

    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert main(["--config", str(path), *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1mega: error: ") and err.count("\n") == 1, err
    assert str(path) in err or "optim.lr" in err, err


def test_cli_prints_one_line_and_exits_2_on_a_bad_dataset(tmp_path, capsys):
    from r1mega.cli import main

    data = tmp_path / "prompts.jsonl.gz"
    data.write_bytes(gzip.compress(b'{"id": "a", "prompt": "q", "task": "math", "answer": "1"}\n' * 50)[:-20])
    completions = tmp_path / "completions.jsonl"
    completions.write_text('{"id": "a", "completion": "1"}\n')
    assert main(["reward", "--data", str(data), "--completions", str(completions)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"r1mega: error: {data}: not a readable gzip file") and err.count("\n") == 1, err


# ---- Hugging Face config.json ---------------------------------------------------------------
HF_BASES = [{"model_type": arch, **cfg} for arch, cfg in CONFIGS.items()] + [{"model_type": "deepseek_v3", **DEEPSEEK_YARN}]
_ROPE_KEYS = ["rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "truncate", "partial_rotary_factor"]
HF_KEYS = sorted({k for base in HF_BASES for k in base} | {
    "rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "layer_types", "quantization_config",
    "hidden_act", "hidden_activation", "tie_word_embeddings", "pretraining_tp", "attention_bias", "mlp_bias",
    "use_sliding_window", "num_nextn_predict_layers", "head_dim", "architectures", "rope_interleave", "scoring_func",
    "topk_method", "moe_layer_freq", "norm_topk_prob", "shared_expert_intermediate_size", "decoder_sparse_step",
    "mlp_only_layers", "num_local_experts"})
HF_PATHS = [(k,) for k in HF_KEYS] + [(p, k) for p in ("rope_parameters", "rope_scaling") for k in _ROPE_KEYS]


def _desc_values(desc) -> list:
    import dataclasses

    out = []
    for f in dataclasses.fields(desc):
        if f.name == "config":
            continue
        v = getattr(desc, f.name)
        out.extend(_desc_values(v) if dataclasses.is_dataclass(v) else [v])
    return out


@st.composite
def hf_configs(draw):
    """The bytes of a fixture model's config.json broken once."""
    kind = draw(st.sampled_from(["set", "set", "set", "set", "drop", "extra", "bytes", "whole"]))
    return broken_json(draw, draw(st.sampled_from(HF_BASES)), kind, st.sampled_from(HF_PATHS),
                       st.sampled_from(HF_PATHS), st.text(min_size=1, max_size=8).map(lambda k: (k,)))


def _hf_with(arch: str, path: tuple, raw: str) -> bytes:
    return json_with({"model_type": arch, **CONFIGS[arch]}, path, raw).encode()


@fuzz(1500)
@given(content=hf_configs())
@example(content=_hf_with("qwen2", ("hidden_act",), '"gelu"'))  # the refusal did not name the file
@example(content=_hf_with("llama", ("rms_norm_eps",), '"x"'))  # ValueError from float()
@example(content=_hf_with("llama", ("rms_norm_eps",), "[1]"))  # TypeError from float()
@example(content=_hf_with("llama", ("rms_norm_eps",), "NaN"))  # accepted: norm_eps nan
@example(content=_hf_with("qwen2", ("rope_theta",), "9" * 4000))  # OverflowError from float()
@example(content=_hf_with("qwen2", ("torch_dtype",), '["x"]'))  # TypeError: unhashable
@example(content=_hf_with("qwen2", ("layer_types",), "3"))  # TypeError: not iterable
@example(content=_hf_with("qwen3_moe", ("mlp_only_layers",), "5"))  # TypeError: not iterable
@example(content=_hf_with("llama", ("rope_parameters", "factor"), "null"))  # KeyError 'factor'
@example(content=_hf_with("qwen2", ("tie_word_embeddings",), '"false"'))  # accepted as True
@example(content=_hf_with("deepseek_v3", ("num_hidden_layers",), "9" * 18))  # a 10**18-element tuple: a hang
@example(content=_hf_with("deepseek_v3", ("num_nextn_predict_layers",), '"1"'))  # refused now: the checkpoint check adds it to an int
@example(content=b'{"model_type": "\xff"}')  # UnicodeDecodeError
@example(content=b'{"model_type": ' + b"[" * DEEP)  # RecursionError
def test_hf_config_describes_or_names_file_and_key(content):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(content)
        file = Path(tmp) / "config.json"
        desc, msg = outcome(lambda: describe_hf_model(tmp), UnsupportedModelError, file)
    if msg is None:
        tie = json.loads(content).get("tie_word_embeddings")
        assert desc.tie_embeddings is (tie is True), desc  # a string "false" is no true
        for v in _desc_values(desc):
            assert v is None or isinstance(v, (bool, int, float, str, tuple)), v
            assert finite(v), desc
            assert not isinstance(v, int) or isinstance(v, bool) or 0 <= v < 2**63, desc


def test_hf_fixture_configs_describe():
    for base in HF_BASES:
        assert describe_hf_config(base).arch == base["model_type"]


# ---- Hugging Face safetensors headers and index ---------------------------------------------
# A tiny qwen2 (tied embeddings): a few small F32 tensors, in one file or two shards with an index.
TINY = dict(model_type="qwen2", vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _expected():
    from r1mega.models import expected_hf_tensors

    return expected_hf_tensors(describe_hf_config(TINY))


def st_file(tensors: dict[str, tuple[str, list]], *, header_text: bytes | None = None) -> tuple[bytes, int]:
    """(bytes, header end) of a safetensors file of zero-filled tensors {name: (dtype, shape)}."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * ST_SIZES.get(dtype, 4)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = header_text if header_text is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(offset), 8 + len(text)


def write_checkpoint(root: Path, tensors: dict[str, tuple[str, list]], sharded: bool,
                     index_text: str | None = None) -> list[tuple[Path, int]]:
    """Write config.json and the weights; return (file, header end) of each weight file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY))
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]] if sharded else [names]
    files = []
    for k, part in enumerate(shards):
        file = root / (f"model-0000{k + 1}-of-0000{len(shards)}.safetensors" if sharded else "model.safetensors")
        data, end = st_file({n: tensors[n] for n in part})
        file.write_bytes(data)
        files.append((file, end))
    if sharded:
        weight_map = {n: files[k][0].name for k, part in enumerate(shards) for n in part}
        (root / "model.safetensors.index.json").write_text(
            index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def check_or_refuse(root: Path):
    """check_hf_checkpoint of `root`: refused in one line naming the directory, or passed, and
    then every tensor of every weight file loads with safetensors, with the shape it declares."""
    from safetensors import safe_open

    from r1mega.models import CheckpointError, check_hf_checkpoint

    desc = describe_hf_config(TINY)
    result, msg = outcome(lambda: check_hf_checkpoint(root, desc), CheckpointError, root)
    if msg is not None:
        return msg
    tensors, _ = result
    with no_hang():
        for name, info in tensors.items():
            with safe_open(str(root / info.file), framework="numpy") as f:
                assert tuple(f.get_slice(name).get_shape()) == info.shape
                assert f.get_tensor(name).shape == info.shape
    return None


# What the reader handles today: the header's bytes and length broken, tensors missing, extra,
# mis-shaped or of a wrong dtype (the file rewritten consistently), an index naming a missing
# file, unreadable, or not an object.
@st.composite
def checkpoints_broken_cleanly(draw):
    expected = _expected()
    tensors = {n: ("F32", list(s)) for n, s in expected.items()}
    sharded = draw(st.booleans())
    kind = draw(st.sampled_from(["header_bytes", "size", "empty", "drop", "extra", "shape", "dtype", "index",
                                 "index_bytes", "none"]))
    names = sorted(tensors)
    index_text = None
    if kind == "drop":
        tensors.pop(draw(st.sampled_from(names)))
    elif kind == "extra":
        tensors[draw(st.text(min_size=1, max_size=12))] = ("F32", draw(st.lists(st.integers(0, 4), max_size=3)))
    elif kind == "shape":
        tensors[draw(st.sampled_from(names))] = ("F32", draw(st.lists(st.integers(0, 9), max_size=3)))
    elif kind == "dtype":
        tensors[draw(st.sampled_from(names))] = (draw(st.sampled_from(["I64", "I32", "U8", "BOOL", "Q7", "", "f32"])),
                                                 list(expected[names[0]]))
    elif kind == "index" and sharded:
        index_text = draw(st.sampled_from(["[]", "1", "null", '"x"', "{}", '{"weight_map": {}}',
                                           '{"weight_map": {"model.norm.weight": "missing.safetensors"}}',
                                           '{"weight_map": {"model.norm.weight": "config.json"}}']))
    return tensors, sharded, kind, index_text, draw(byte_mutations()), draw(st.integers(0, 2**64 - 1)), draw(st.booleans())


@fuzz(500)
@given(case=checkpoints_broken_cleanly())
def test_hf_checkpoint_checks_or_names_the_file(case):
    tensors, sharded, kind, index_text, mutation, size, first = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        files = write_checkpoint(root, tensors, sharded, index_text)
        file, end = files[0 if first else -1]
        data = file.read_bytes()
        if kind == "header_bytes":  # truncated within the header, or invalid UTF-8 written into it
            if mutation[0] != "flip":
                file.write_bytes(apply_bytes(data, mutation, 0, end) if mutation[0] == "truncate" else
                                 apply_bytes(data, ("replace", mutation[1], b"\xff"), 8, end - 1))
        elif kind == "size":
            file.write_bytes(struct.pack("<Q", size) + data[8:])
        elif kind == "empty":
            file.write_bytes(b"")
        elif kind == "index_bytes" and sharded:
            index = root / "model.safetensors.index.json"
            raw = index.read_bytes()
            index.write_bytes(apply_bytes(raw, ("truncate", mutation[1], b""), 0, len(raw) - 1)
                              if mutation[0] == "truncate" else apply_bytes(raw, ("replace", mutation[1], b"\xff")))
        check_or_refuse(root)


def test_hf_checkpoint_unbroken_passes(tmp_path):
    tensors = {n: ("F32", list(s)) for n, s in _expected().items()}
    for sharded in (False, True):
        write_checkpoint(tmp_path / str(sharded), tensors, sharded)
        assert check_or_refuse(tmp_path / str(sharded)) is None


# Found by these properties and fixed in r1mega/models/safetensors_io.py: a header that is JSON but
# not the format's structure, data that does not match its header (truncated by a byte, offsets or
# dtypes that disagree, trailing bytes, metadata that is not strings), an index whose weight_map is
# not names -> file names, nesting past the recursion limit. The minimal input of each is kept.
HEADER_SHAPES = ['[]', '1', 'null', '"x"', '{"t": 1}', '{"t": {"shape": [1]}}', '{"t": {"dtype": "F32"}}',
                 '{"t": {"dtype": "F32", "shape": 3, "data_offsets": [0, 4]}}',
                 '{"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
                 '{"model.norm.weight": {"dtype": {}, "shape": [8], "data_offsets": [0, 32]}}',
                 '{"t": {"dtype": "F32", "shape": [null], "data_offsets": [0, 4]}}',
                 '{"__metadata__": {"format": "pt"}, "t": []}']


@fuzz(50)
@given(header=st.sampled_from(HEADER_SHAPES) | json_values.map(json.dumps), sharded=st.booleans())
@example(header="[]", sharded=False)
def test_hf_safetensors_header_of_wrong_structure_is_refused(header, sharded):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        tensors = {n: ("F32", list(s)) for n, s in _expected().items()}
        files = write_checkpoint(root, tensors, sharded)
        file = files[0][0]
        file.write_bytes(st_file({}, header_text=header.encode())[0])
        check_or_refuse(root)


@fuzz(50)
@given(cut=st.integers(1, 64), kind=st.sampled_from(["truncate", "offsets", "dtype", "metadata", "trailing"]),
       sharded=st.booleans())
@example(cut=1, kind="truncate", sharded=False)
def test_hf_safetensors_data_that_does_not_match_its_header_is_refused(cut, kind, sharded):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        tensors = {n: ("F32", list(s)) for n, s in _expected().items()}
        file, end = write_checkpoint(root, tensors, sharded)[0]
        data = file.read_bytes()
        header = json.loads(data[8:end])
        if kind == "truncate":
            data = data[:max(end, len(data) - cut)]
        elif kind == "trailing":
            data = data + bytes(cut)
        else:
            name = sorted(k for k in header if k != "__metadata__")[cut % (len(header) - 1)]
            if kind == "offsets":
                header[name]["data_offsets"][1] += cut
            elif kind == "dtype":
                header[name]["dtype"] = "F64"
            else:
                header["__metadata__"] = {"format": cut}
            data = st_file({}, header_text=json.dumps(header).encode())[0] + data[end:]
        file.write_bytes(data)
        check_or_refuse(root)


@fuzz(50)
@given(weight_map=st.sampled_from(['[]', '"x"', '1', '{"model.norm.weight": 1}', '{"model.norm.weight": []}',
                                   '{"model.norm.weight": null}', '{"model.norm.weight": {"a": 1}}'])
       | json_values.map(json.dumps))
@example(weight_map='{"model.norm.weight": 1}')
def test_hf_index_of_wrong_structure_is_refused(weight_map):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        tensors = {n: ("F32", list(s)) for n, s in _expected().items()}
        write_checkpoint(root, tensors, True, index_text='{"weight_map": ' + weight_map + "}")
        check_or_refuse(root)


@fuzz(20)
@given(depth=st.sampled_from([DEEP, 10 * DEEP, 5000]), where=st.sampled_from(["header", "index"]))
@example(depth=DEEP, where="header")
def test_hf_deeply_nested_header_or_index_is_refused(depth, where):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        tensors = {n: ("F32", list(s)) for n, s in _expected().items()}
        files = write_checkpoint(root, tensors, where == "index")
        nested = "[" * depth + "]" * depth
        if where == "header":
            files[0][0].write_bytes(st_file({}, header_text=nested.encode())[0])
        else:
            (root / "model.safetensors.index.json").write_text('{"weight_map": ' + nested + "}")
        check_or_refuse(root)
