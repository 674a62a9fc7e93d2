"""What every reward shares: its result (:class:`RewardOutput`), its signature (:data:`RewardFn`)
and the argument checks and tag parsing the rule modules use.

A reward is a function ``fn(record, completion, **options) -> RewardOutput`` of one
:class:`~r1mega.data.records.PromptRecord` and the decoded completion text (special tokens
already stripped). The names a run's reward weights use map to such functions in
:mod:`r1mega.rewards.registry`, which sits above the rule modules (they import only this one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from r1mega.data.records import PromptRecord


@dataclass(frozen=True)
class RewardOutput:
    """The result of one reward on one completion.

    value: the reward, a finite float (0.0 when ``skipped``).
    info: diagnostics for logs and debugging (e.g. the extracted answer, why a check failed);
        small, picklable, JSON-friendly values only.
    skipped: the reward does not apply to this record (e.g. "language" on a record whose
        ``language`` is None). A skipped reward adds nothing to the weighted total and is left
        out of that reward's mean in the metrics.
    """

    value: float
    info: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise ValueError(f"RewardOutput.value must be a float, got {type(self.value).__name__} "
                             f"{self.value!r}")
        if not math.isfinite(self.value):
            raise ValueError(f"RewardOutput.value must be finite, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def skip(cls, reason: str) -> RewardOutput:
        """A reward that does not apply to the record, with the reason in ``info``."""
        return cls(0.0, {"skipped": reason}, skipped=True)


RewardFn = Callable[..., RewardOutput]
"""``fn(record: PromptRecord, completion: str, **options) -> RewardOutput``."""


def check_record(record: object) -> PromptRecord:
    if not isinstance(record, PromptRecord):
        raise ValueError(f"record must be a PromptRecord, got {type(record).__name__}")
    return record


def check_completion(completion: object) -> str:
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    return completion


def last_tag_block(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the last complete ``open_tag ... close_tag`` block of ``text``, or None."""
    end = text.rfind(close_tag)
    if end < 0:
        return None
    start = text.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return text[start + len(open_tag):end]
