"""Preference pairs for reward-model training: JSONL (or JSON / Parquet) rows, validated before any work.

A row is ``{"prompt": str, "chosen": str, "rejected": str}`` (optional ``id``: a string or an
integer, unique in the file): `chosen` is the completion preferred over `rejected` for `prompt`.
The three texts must be non-empty strings and `chosen` must differ from `rejected`. Other fields
(``family``, ``language``, ...) are kept but not read. A bad row stops the run with one line
naming the file, the row and the field (r1mega.data.DataError, as the SFT loader's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from r1mega.data import RowError, read_checked_rows

FIELDS = ("prompt", "chosen", "rejected")


def _pair(row: Any, index: int) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    ident = row.get("id", f"row-{index}")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise RowError(f"field 'id': expected a string or integer, got {type(ident).__name__}")
    for name in FIELDS:
        if name not in row:
            raise RowError(f"field {name!r}: missing (a row is prompt + chosen + rejected)")
        value = row[name]
        if not isinstance(value, str):
            raise RowError(f"field {name!r}: expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError(f"field {name!r}: empty")
    if row["chosen"] == row["rejected"]:
        raise RowError("field 'rejected': the same text as 'chosen' (a pair must prefer one of two different "
                        "completions)")
    return {**row, "id": str(ident)}


def load_preference_pairs(path: str | Path) -> list[dict]:
    """Every row of `path` as a dict with ``id`` (a str; ``row-N`` when absent), ``prompt``,
    ``chosen``, ``rejected`` and the row's other fields; DataError (one line: file, row, field)
    on the first bad row, a duplicate id, an unreadable file or a file without rows."""
    return read_checked_rows(path, _pair, lambda p: p["id"])
