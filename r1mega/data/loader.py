"""Prompt datasets from local files: JSON Lines, JSON arrays and Parquet, validated on load.

Every row becomes a :class:`~r1mega.data.records.PromptRecord`. A row is an object with the
record's fields — ``id``, ``prompt``, ``task``, ``answer``, ``tests``, ``language`` — and any
other fields, which are kept in ``meta`` (an object-valued ``meta`` field is merged into it; a null
extra field counts as absent, since Parquet stores a null where a row has no value).

Validation happens before anything is returned, and the first bad row stops the load with one
:class:`DataError` line naming the file, the row and the field::

    data/train.jsonl: line 7: field 'answer': missing (required for task 'math')
    data/code.parquet: row 3 (0-based): field 'tests': item 2 of 4 must have 'input' and 'output' ...

Row numbering: JSON Lines say ``line N``, 1-based like an editor (blank lines count and are
skipped); JSON arrays (a ``.json`` file whose text starts with ``[``; a ``.jsonl`` file is always
JSON Lines) and Parquet files say ``row N (0-based)``, the index of the row in the array
or table as Python, pandas and pyarrow number it. Items of ``tests`` are numbered ``item N of M``,
1-based.

Checks: each row is an object; ``id`` (a string, or an integer kept as its decimal string) is
present, non-empty and unique in the file (a duplicate names both rows); ``prompt`` is a non-empty
string; ``task`` is one of :data:`~r1mega.data.records.TASKS` (rows without one take the caller's
default ``task=``); ``answer`` is a string (an integer is kept as its decimal string; a float is
refused, since its text would not survive) and is required for "math" and "countdown"; a
"countdown" answer is an integer and the row has ``numbers``, a list of integers (kept in
``meta["numbers"]``); ``tests`` is a non-empty list of ``{"input": str, "output": str}`` or
``{"assert": str}`` objects and is required for "code"; ``language`` is null or one of
:data:`LANGUAGES`.

:func:`write_prompts` writes records as JSON Lines that :func:`load_prompts` reads back equal, and
refuses a record that would not survive the trip.
"""

from __future__ import annotations

import difflib
import gzip
import json
import re
import reprlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from r1mega.data.formats import FORMATS, Columns, FormatError, adapt_row
from r1mega.data.records import LANGUAGES, TASKS, PromptRecord
from r1mega.utils.io import atomic_write_bytes, atomic_write_text

T = TypeVar("T")

_CORE = ("id", "prompt", "task", "answer", "tests", "language")
_TEST_KEYS = ("input", "output", "assert")
_NEEDS_ANSWER = ("math", "countdown")
_INT_RE = re.compile(r"-?\d+")
_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


class DataError(ValueError):
    """A malformed dataset; the message is one line naming the file, the row and the field."""


class RowError(Exception):
    """A bad field inside a row; the caller (:func:`read_checked_rows`) prefixes the file and row."""


_RowError = RowError

# Values quoted in messages are cut to about this many characters (a huge value must not make a
# huge message) and nested containers to a few levels.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_shown = _SHOWN.repr
_MAX_ROW_MESSAGE = 400  # characters of a RowError from a parse function (longer ones are elided)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _did_you_mean(value: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_text(name: str, value: Any) -> str:
    """A string field; integers are accepted as their decimal text (ids and answers often are)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        raise _RowError(f"field {name!r}: must be a string, got float {_shown(value)} "
                        "(quote it in the file to keep its exact text)")
    raise _RowError(f"field {name!r}: must be a string, got {_kind(value)}")


def _parse_tests(value: Any, task: str) -> tuple[dict[str, str], ...] | None:
    if value is None:
        if task == "code":
            raise _RowError("field 'tests': missing (required for task 'code')")
        return None
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"field 'tests': must be a list of test objects, got {_kind(value)}")
    if not value:
        raise _RowError("field 'tests': empty (needs at least one test)")
    tests = []
    for i, item in enumerate(value, 1):
        where = f"field 'tests': item {i} of {len(value)}"
        if not isinstance(item, dict):
            raise _RowError(f"{where} must be an object, got {_kind(item)}")
        # Parquet stores a list of structs with every key of every item; absent keys read as null.
        item = {k: v for k, v in item.items() if v is not None}
        for k in item:
            if k not in _TEST_KEYS:
                raise _RowError(f"{where}: unknown key {_shown(k)} (allowed: 'input', 'output', 'assert')")
        io_ok = set(item) == {"input", "output"} and all(isinstance(item[k], str) for k in item)
        assert_ok = set(item) == {"assert"} and isinstance(item["assert"], str) and item["assert"].strip()
        if not (io_ok or assert_ok):
            raise _RowError(f"{where} must have 'input' and 'output' strings or an 'assert' string")
        tests.append(dict(item))
    return tuple(tests)


def _record_from_row(row: Any, default_task: str | None) -> PromptRecord:
    """Validate one row and build its record, or raise _RowError naming the field."""
    if not isinstance(row, dict):
        raise _RowError(f"expected an object, got {_kind(row)}")
    meta: dict[str, Any] = {}
    nested = row.get("meta")
    if nested is not None:
        if not isinstance(nested, dict):
            raise _RowError(f"field 'meta': must be an object, got {_kind(nested)}")
        meta.update(nested)
    for key, value in row.items():
        # A null extra field is an absent one (Parquet columns hold a null where a row has no value).
        if key in _CORE or key == "meta" or value is None:
            continue
        if key in meta:
            raise _RowError(f"field {_shown(key)}: given both at top level and inside 'meta'")
        meta[key] = value

    if row.get("id") is None:
        raise _RowError("field 'id': missing")
    rid = _as_text("id", row["id"])
    if not rid.strip():
        raise _RowError("field 'id': empty")

    if row.get("prompt") is None:
        raise _RowError("field 'prompt': missing")
    if not isinstance(row["prompt"], str):
        raise _RowError(f"field 'prompt': must be a string, got {_kind(row['prompt'])}")
    if not row["prompt"].strip():
        raise _RowError("field 'prompt': empty")

    task = row.get("task")
    if task is None:
        if default_task is None:
            raise _RowError("field 'task': missing (or pass a default task= to load_prompts)")
        task = default_task
    if not isinstance(task, str):
        raise _RowError(f"field 'task': must be a string, got {_kind(task)}")
    if task not in TASKS:
        raise _RowError(f"field 'task': {_shown(task)} is not one of "
                        f"{', '.join(map(repr, TASKS))}{_did_you_mean(task, TASKS)}")

    answer = row.get("answer")
    if answer is None:
        if task in _NEEDS_ANSWER:
            raise _RowError(f"field 'answer': missing (required for task {task!r})")
    else:
        answer = _as_text("answer", answer)
        if task in _NEEDS_ANSWER and not answer.strip():
            raise _RowError(f"field 'answer': empty (required for task {task!r})")
    if task == "countdown":
        if not _INT_RE.fullmatch(answer.strip()):
            raise _RowError(f"field 'answer': {_shown(answer)} is not an integer (the countdown target)")
        numbers = meta.get("numbers")
        if numbers is None:
            raise _RowError("field 'numbers': missing (required for task 'countdown')")
        if (not isinstance(numbers, list) or not numbers
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in numbers)):
            raise _RowError("field 'numbers': must be a non-empty list of integers")

    tests = _parse_tests(row.get("tests"), task)

    language = row.get("language")
    if language is not None:
        if not isinstance(language, str):
            raise _RowError(f"field 'language': must be a string or null, got {_kind(language)}")
        if language not in LANGUAGES:
            raise _RowError(f"field 'language': {_shown(language)} is not a known language code "
                            f"(one of {', '.join(LANGUAGES)}, or null){_did_you_mean(language, LANGUAGES)}")

    return PromptRecord(id=rid, prompt=row["prompt"], task=task, answer=answer, tests=tests,
                        language=language, meta=meta)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(_SUFFIXES)})")


# What reading a file can raise below the JSON: a truncated or corrupt gzip stream, an I/O error.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _one_line(err: BaseException) -> str:
    """A library's error message as one line of printable text (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(err).split()))


def _unreadable(path: Path, err: BaseException) -> DataError:
    kind = "gzip file" if path.name.lower().endswith(".gz") else "file"
    return DataError(f"{path}: not a readable {kind} ({_one_line(err)})")


def _parse_json(path: Path, where: str | None, text: str) -> Any:
    """json.loads of one line (`where`) or of a whole file (None); DataError for what it refuses:
    bad syntax, nesting deeper than the interpreter's recursion limit, an integer of more digits
    than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = where or f"line {e.lineno}"
        raise DataError(f"{path}: {where}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as e:
        problem = _one_line(e)
    raise DataError(f"{path}: {where + ': ' if where else ''}invalid JSON: {problem}") from None


def _raw_lines(path: Path, opener: Callable) -> Iterator[bytes]:
    try:
        with opener(path, "rb") as f:
            yield from f
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # A .json file is one JSON array of objects or JSON Lines; a .jsonl file always JSON Lines
    # (a row that is an array is a bad row, not the start of an array).
    array = False
    try:
        if _suffix(path) in (".json", ".json.gz"):
            with opener(path, "rb") as f:
                array = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        if array:
            with opener(path, "rb") as f:
                data = f.read()
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    if array:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        for i, row in enumerate(_parse_json(path, None, text)):
            yield f"row {i} (0-based)", row
        return
    for lineno, raw in enumerate(_raw_lines(path, opener), 1):
        where = f"line {lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: {where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        yield where, _parse_json(path, where, line)


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: a column name not UTF-8
        raise DataError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None
    index = 0
    batches = file.iter_batches(batch_size=4096)
    while True:
        try:  # a file whose footer reads can still hold pages that do not
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except (pa.ArrowException, OSError, ValueError, OverflowError) as e:
            raise DataError(f"{path}: row {index} (0-based): not a readable Parquet row group: "
                            f"{_one_line(e)}") from None
        if batch is None:
            return
        for row in rows:
            yield f"row {index} (0-based)", row
            index += 1


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = _suffix(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return _parquet_rows(path) if suffix == ".parquet" else _json_rows(path)


def _shard_rows(path: Path, shards: list[Path]) -> Iterator[tuple[str, Any]]:
    for shard in shards:
        for where, row in _file_rows(shard):
            yield f"{shard.relative_to(path)}: {where}", row


def _saved_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    from r1mega.data.hf_datasets import SavedDatasetError, saved_dataset_rows

    try:
        yield from saved_dataset_rows(path, split)
    except SavedDatasetError as err:
        raise DataError(str(err)) from None


def read_rows(path: str | Path, *, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of a .jsonl, .json, .jsonl.gz, .json.gz or .parquet file, of a
    directory of such shards (in name order; where names the shard), or of a directory written by
    ``datasets``' ``save_to_disk`` (`split`: the split of a saved DatasetDict). `where` is
    "line N" or "row N (0-based)" for error messages; DataError for an unsupported, missing or
    unreadable file."""
    from r1mega.data.hf_datasets import is_saved_dataset

    path = Path(path)
    if path.is_dir():
        if is_saved_dataset(path):
            return _saved_rows(path, split)
        shards = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(_SUFFIXES))
        if not shards:
            raise DataError(f"{path}: a directory without data files (expected {', '.join(_SUFFIXES)} shards, "
                            "or a datasets save_to_disk directory)")
        rows = _shard_rows(path, shards)
    else:
        rows = _file_rows(path)
    if split is not None:
        raise DataError(f"{path}: data.split {split!r} is for a saved DatasetDict directory")
    return rows


def _bounded(message: str) -> str:
    """`message`, its middle elided when it is longer than _MAX_ROW_MESSAGE (a parse function
    that quoted a huge value)."""
    if len(message) <= _MAX_ROW_MESSAGE:
        return message
    keep = _MAX_ROW_MESSAGE // 2
    return f"{message[:keep]} ... {message[-keep:]}"


def read_checked_rows(path: str | Path, parse: Callable[[Any, int], T], ident: Callable[[T], str], *,
                      split: str | None = None) -> list[T]:
    """``parse(row, index)`` of every row of `path` (:func:`read_rows`), in order. DataError, one
    line naming the file and the row, when `parse` raises RowError, when two rows have the same
    ``ident``, or when the file has no rows."""
    path = Path(path)
    out: list[T] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(read_rows(path, split=split)):
        try:
            item = parse(row, index)
        except RowError as err:
            raise DataError(f"{path}: {where}: {_bounded(str(err))}") from None
        key = ident(item)
        if key in seen:
            raise DataError(f"{path}: {where}: field 'id': duplicate {_shown(key)} (first at {seen[key]})")
        seen[key] = where
        out.append(item)
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def load_prompts(path: str | Path, *, task: str | None = None, format: str = "r1mega", prompt_key: str | None = None,
                 answer_key: str | None = None, id_key: str | None = None, split: str | None = None) -> list[PromptRecord]:
    """Read and validate every row of a dataset as :func:`read_rows` reads it.

    format: how its rows are written (r1mega.data.formats: "r1mega" rows, or a published format
        such as "gsm8k", "math", "humaneval"); prompt_key / answer_key / id_key: the columns that
        hold the question, the gold answer and the id instead of the format's own; rows without
        an id take their 0-based index.
    task: the task of r1mega rows that have no ``task`` field (rows that have one keep theirs).
    split: the split of a saved DatasetDict directory.
    Raises DataError (one line: file, row, field) on the first malformed row, a duplicate id, an
    unreadable or unsupported file, or a file without rows.
    """
    if task is not None and task not in TASKS:
        raise DataError(f"load_prompts: task={_shown(task)} is not one of "
                        f"{', '.join(map(repr, TASKS))}{_did_you_mean(str(task), TASKS)}")
    if format not in FORMATS:
        raise DataError(f"data.format: {_shown(format)} is not one of {', '.join(FORMATS)}"
                        f"{_did_you_mean(str(format), FORMATS)}")
    columns = Columns(prompt_key=prompt_key, answer_key=answer_key, id_key=id_key, task=task)

    def parse(row: Any, index: int) -> PromptRecord:
        try:
            adapted = adapt_row(format, row, index, columns)
        except FormatError as err:
            raise RowError(str(err)) from None
        return _record_from_row(adapted, task)

    return read_checked_rows(path, parse, lambda record: record.id, split=split)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def record_to_row(record: PromptRecord) -> dict[str, Any]:
    """The JSON object `write_prompts` stores for a record (null fields and empty meta left out)."""
    row: dict[str, Any] = {"id": record.id, "prompt": record.prompt, "task": record.task}
    if record.answer is not None:
        row["answer"] = record.answer
    if record.tests is not None:
        row["tests"] = list(record.tests)
    if record.language is not None:
        row["language"] = record.language
    if record.meta:
        row["meta"] = record.meta
    return row


def write_prompts(path: str | Path, records: Iterable[PromptRecord]) -> int:
    """Write records as JSON Lines, atomically; `load_prompts(path)` returns them equal.

    Each record is validated like a loaded row and must survive the JSON round trip (``tests`` a
    tuple of dicts of strings; ``meta`` JSON-native: string keys, lists rather than tuples), else
    DataError names the record and the field. Returns the number of records written.
    """
    path = Path(path)
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        raise DataError(f"{path}: write_prompts writes JSON Lines; name the file *.jsonl or *.jsonl.gz")
    lines = []
    seen: dict[str, int] = {}
    for i, record in enumerate(records):
        if not isinstance(record, PromptRecord):
            raise DataError(f"{path}: record {i} (0-based): expected a PromptRecord, got {_kind(record)}")
        where = f"{path}: record {i} (0-based, id {_shown(record.id)})"
        try:
            line = json.dumps(record_to_row(record), ensure_ascii=False, allow_nan=False)
            back = _record_from_row(json.loads(line), None)
        except (TypeError, ValueError) as e:
            field = next((k for k, v in record_to_row(record).items() if not _json_ok(v)), "meta")
            raise DataError(f"{where}: field {field!r}: not JSON-serialisable: {e}") from None
        except _RowError as e:
            raise DataError(f"{where}: {e}") from None
        for name in ("id", "prompt", "task", "answer", "tests", "language", "meta"):
            if getattr(back, name) != getattr(record, name):
                raise DataError(f"{where}: field {name!r}: does not survive a JSON round trip "
                                "(tests must be a tuple of str->str dicts; meta must be JSON-native: "
                                "str keys, lists not tuples, str/int answers as str)")
        if record.id in seen:
            raise DataError(f"{where}: field 'id': duplicate (first at record {seen[record.id]})")
        seen[record.id] = i
        lines.append(line + "\n")
    text = "".join(lines)
    if not lines:
        raise DataError(f"{path}: no records to write (load_prompts refuses an empty file)")
    if path.name.lower().endswith(".gz"):
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        atomic_write_text(path, text)
    return len(lines)


def load_completions(path: str | Path, records: Iterable[PromptRecord]) -> list[tuple[PromptRecord, str]]:
    """Read completions to score: rows ``{"id": <prompt id>, "completion": <text>}``, in file order.

    A prompt may have several completions (a GRPO group). Every id must name one of `records`;
    raises DataError (one line: file, row, field) otherwise, or for a missing or non-string
    completion, before anything is scored.
    """
    path = Path(path)
    rows = _file_rows(path)
    by_id = {record.id: record for record in records}
    pairs: list[tuple[PromptRecord, str]] = []
    for where, row in rows:
        try:
            if not isinstance(row, dict):
                raise _RowError(f"expected an object, got {_kind(row)}")
            if row.get("id") is None:
                raise _RowError("field 'id': missing")
            rid = _as_text("id", row["id"])
            if rid not in by_id:
                raise _RowError(f"field 'id': {_shown(rid)} is not a prompt of the dataset"
                                f"{_did_you_mean(rid, by_id)}")
            if "completion" not in row:
                raise _RowError("field 'completion': missing")
            if not isinstance(row["completion"], str):
                raise _RowError(f"field 'completion': must be a string, got {_kind(row['completion'])}")
        except _RowError as e:
            raise DataError(f"{path}: {where}: {e}") from None
        pairs.append((by_id[rid], row["completion"]))
    if not pairs:
        raise DataError(f"{path}: no rows")
    return pairs
