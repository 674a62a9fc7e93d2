"""Synthetic verifiable tasks that ship with r1mega: nothing to download.

Three generators, each ``generate(n, *, seed, difficulty, split="train") -> list[PromptRecord]``
with ``solution(record, style="r1") -> str``:

- ``arithmetic`` (task "math"): multi-digit +, -, * and exact division; difficulty = digits.
- ``countdown`` (task "countdown", as in TinyZero): reach a target with given numbers.
- ``programming`` (task "code"): small programs and functions with tests.

Determinism: a generator's output is a function of ``(seed, difficulty, split, n)`` only, and a
longer run extends a shorter one (``generate(n)`` is a prefix of ``generate(n + k)``).

Held-out split: every problem has a canonical key (commutative operands sorted, countdown numbers
sorted, program family and parameters), and a stable hash of the key puts the problem in "test"
(:data:`HELD_OUT_PERCENT` % of problems) or "train". The partition is a property of the problem
itself, so no problem is ever in both splits, whatever the seed, difficulty or n. Ids are
``{name}-d{difficulty}-{hash}``: the same problem at the same difficulty always gets the same id.

Solutions, for cold-start SFT data (``solution`` / :func:`write_sft`), in two renderings:

- ``style="r1"``: ``<think>\\n{steps}\\n</think>\\n\\n{summary}``, the DeepSeek-R1 format; a math
  summary ends with ``\\boxed{answer}``, a countdown summary with ``<answer> expr </answer>`` (the
  countdown prompt asks for those tags), a programming summary with a fenced python block.
- ``style="r1-zero"``: ``<think>\\n{steps}\\n</think> <answer> {final answer} </answer>``, the
  R1-Zero format (for code, the answer holds the fenced python block).

A completion starts with ``<think>``; a chat template that already opens the think block in the
prompt should drop it (templates are r1mega.templates' business, not this package's).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from r1mega.data.loader import write_prompts
from r1mega.data.records import PromptRecord
from r1mega.data.synthetic import arithmetic, countdown, programming
from r1mega.data.synthetic.common import HELD_OUT_PERCENT, SPLITS, STYLES, check_style, split_of
from r1mega.utils.io import atomic_write_text


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    task: str  # the PromptRecord.task of its records
    difficulties: range
    generate: Callable[..., list[PromptRecord]]
    solution: Callable[..., str]


TASKS_BY_NAME: dict[str, SyntheticTask] = {
    m.NAME: SyntheticTask(m.NAME, m.TASK, m.DIFFICULTIES, m.generate, m.solution)
    for m in (arithmetic, countdown, programming)
}


def get_task(name: str) -> SyntheticTask:
    if name not in TASKS_BY_NAME:
        close = difflib.get_close_matches(str(name), list(TASKS_BY_NAME), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown synthetic task {name!r}: one of "
                         f"{', '.join(map(repr, TASKS_BY_NAME))}{hint}")
    return TASKS_BY_NAME[name]


def write_task(name: str, path: str | Path, n: int, *, seed: int, difficulty: int,
               split: str = "train") -> list[PromptRecord]:
    """Generate n problems of task `name` and write them as JSONL for `load_prompts`."""
    records = get_task(name).generate(n, seed=seed, difficulty=difficulty, split=split)
    write_prompts(path, records)
    return records


def write_sft(name: str, path: str | Path, n: int, *, seed: int, difficulty: int,
              style: str = "r1", split: str = "train") -> list[dict[str, str]]:
    """Write cold-start SFT pairs as JSONL rows ``{"prompt": ..., "completion": ...}``.

    The prompt is the raw question (``PromptRecord.prompt``), not wrapped in any chat or R1
    template: apply the same template at SFT time as at RL time (r1mega.templates). The completion
    is ``solution(record, style)``. Uses the train split unless told otherwise, so the held-out
    test problems stay unseen.
    """
    spec = get_task(name)
    check_style(style)
    records = spec.generate(n, seed=seed, difficulty=difficulty, split=split)
    rows = [{"prompt": r.prompt, "completion": spec.solution(r, style=style)} for r in records]
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def synth_command(cfg, *, task: str, out: str | Path, solutions: str | Path | None = None) -> int:
    """``r1mega synth``: write `task`'s problems (cfg.synth: n, difficulty, split; seed run.seed) to
    `out`, and their reference solutions in cfg.synth.style to `solutions` when given."""
    s = cfg.synth
    records = write_task(task, out, s.n, seed=cfg.run.seed, difficulty=s.difficulty, split=s.split)
    print(f"wrote {len(records)} {task} prompts to {out}")
    if solutions:
        solution = get_task(task).solution
        atomic_write_text(solutions, "".join(
            json.dumps({"id": r.id, "completion": solution(r, style=s.style)}, ensure_ascii=False) + "\n"
            for r in records))
        print(f"wrote their {s.style} solutions to {solutions}")
    return 0


__all__ = ["HELD_OUT_PERCENT", "SPLITS", "STYLES", "SyntheticTask", "TASKS_BY_NAME", "get_task",
           "split_of", "synth_command", "write_sft", "write_task"]
