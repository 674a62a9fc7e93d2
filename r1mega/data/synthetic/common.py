"""Machinery shared by the synthetic task generators: split hashing, ids, sampling, rendering."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

from r1mega.data.records import PromptRecord

HELD_OUT_PERCENT = 10
SPLITS = ("train", "test")
STYLES = ("r1", "r1-zero")
# Consecutive draws that may produce nothing new before a generator gives up: the problem space
# of the requested split and difficulty is (nearly) exhausted.
_MAX_STALE_DRAWS = 20_000


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def split_of(key: str) -> str:
    """The split a problem with canonical `key` belongs to: "test" for HELD_OUT_PERCENT % of keys."""
    return "test" if int.from_bytes(_digest(key)[:8], "big") % 100 < HELD_OUT_PERCENT else "train"


def problem_id(name: str, difficulty: int, key: str) -> str:
    return f"{name}-d{difficulty}-{_digest(key)[8:14].hex()}"


def check_args(name: str, n: int, seed: int, difficulty: int, split: str,
               difficulties: range) -> None:
    for arg, value, low in (("n", n, 0), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: {arg}={value!r} must be an integer >= {low}")
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty not in difficulties:
        raise ValueError(f"{name}: difficulty={difficulty!r} must be an integer in "
                         f"{difficulties.start}..{difficulties.stop - 1}")
    if split not in SPLITS:
        raise ValueError(f"{name}: split={split!r} is not one of 'train', 'test'")


def check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"solution: style={style!r} is not one of 'r1', 'r1-zero'")


def check_record(record: PromptRecord, task: str, generator: str, *keys: str) -> dict[str, Any]:
    """The record's meta, after checking it came from `generator` with the meta keys it needs."""
    if record.task != task:
        raise ValueError(f"{generator}.solution: record {record.id!r} has task {record.task!r}, not {task!r}")
    for key in keys:
        if key not in record.meta:
            raise ValueError(f"{generator}.solution: record {record.id!r} has no meta[{key!r}] "
                             f"(not made by r1mega.data.synthetic.{generator}?)")
    return record.meta


def sample_problems(name: str, n: int, seed: int, difficulty: int, split: str,
                    draw: Callable[[random.Random], tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Draw problems until n distinct ones of `split`: [(key, payload)] in draw order.

    draw(rng) -> (canonical key, payload). Raises ValueError when the split's problem space at this
    difficulty runs out first.
    """
    rng = random.Random(f"r1mega.synthetic/{name}/seed={seed}/difficulty={difficulty}/split={split}")
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    stale = 0
    while len(out) < n:
        key, payload = draw(rng)
        if key in seen or split_of(key) != split:
            stale += 1
            if stale > _MAX_STALE_DRAWS:
                raise ValueError(f"{name}: found only {len(out)} distinct {split!r} problems at "
                                 f"difficulty {difficulty}; ask for fewer or raise the difficulty")
            continue
        stale = 0
        seen.add(key)
        out.append((key, payload))
    return out


def render(style: str, reasoning: str, summary: str, final: str) -> str:
    """An R1 (`summary` after the think block) or R1-Zero (`final` in answer tags) completion."""
    check_style(style)
    if style == "r1":
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{summary.strip()}"
    final = final.strip()
    sep = "\n" if "\n" in final else " "
    return f"<think>\n{reasoning.strip()}\n</think> <answer>{sep}{final}{sep}</answer>"
