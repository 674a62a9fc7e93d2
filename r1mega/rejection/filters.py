"""Rejection sampling's filter: which scored completions become SFT data (DeepSeek-R1, stage 3).

Pure functions of a completion's text and scores (the dicts of
:class:`r1mega.evaluation.ScoredSampler`). A completion is kept when the rule rewards verify it
(accuracy 1, or a judge's yes where no rule applies) and it is readable: the format reward is 1,
the reasoning is language-consistent (where the record names a language), it has no runaway
repetition and it is within the length bound. Then per prompt: duplicates dropped (same text up
to whitespace), at most `max_per_prompt` kept, in sample order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

REASONS = ("unscored", "wrong", "format", "language", "repetition", "too long", "truncated", "duplicate",
           "over limit")


@dataclass(frozen=True)
class FilterSettings:
    min_language: float = 0.95  # language consistency needed where the record names a language
    max_tokens: Optional[int] = None  # longest completion kept; None: no bound
    max_repeats: int = 4  # a run of this many copies of one span of words is runaway repetition
    max_span_words: int = 16  # longest span checked for repetition
    max_per_prompt: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_language <= 1.0:
            raise ValueError(f"min_language: {self.min_language} must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens} must be >= 1 or None")
        if self.max_repeats < 2:
            raise ValueError(f"max_repeats: {self.max_repeats} must be >= 2")
        if self.max_span_words < 1:
            raise ValueError(f"max_span_words: {self.max_span_words} must be >= 1")
        if self.max_per_prompt < 1:
            raise ValueError(f"max_per_prompt: {self.max_per_prompt} must be >= 1")


def runaway_repetition(text: str, *, max_repeats: int = 4, max_span_words: int = 16) -> bool:
    """Whether some span of 1..`max_span_words` words occurs `max_repeats` times in a row.

    `max_repeats` copies of a span of s words starting at i means word j equals word j + s for
    every j in [i, i + (max_repeats - 1) * s): a run of that many equal shifted pairs."""
    words = text.split()
    for span in range(1, max_span_words + 1):
        need = (max_repeats - 1) * span
        if need + span > len(words):
            break
        run = 0
        for j in range(len(words) - span):
            run = run + 1 if words[j] == words[j + span] else 0
            if run >= need:
                return True
    return False


def rejection_reason(sample: dict[str, Any], settings: FilterSettings, *, format_name: str = "format",
                     judged: Optional[bool] = None) -> Optional[str]:
    """Why `sample` is not kept (one of REASONS), or None when it is. `judged`: a judge's verdict
    for a record no rule verifies (then accuracy is not looked at)."""
    if judged is None:
        if sample.get("accuracy") is None:
            return "unscored"
        if sample["accuracy"] != 1.0:
            return "wrong"
    elif not judged:
        return "wrong"
    if sample.get(format_name) != 1.0:
        return "format"
    language = sample.get("language")
    if language is not None and language < settings.min_language:
        return "language"
    if runaway_repetition(sample["completion"], max_repeats=settings.max_repeats,
                          max_span_words=settings.max_span_words):
        return "repetition"
    if sample.get("finish_reason") == "length":
        return "truncated"
    if settings.max_tokens is not None and sample["tokens"] > settings.max_tokens:
        return "too long"
    return None


def select(samples: Sequence[dict[str, Any]], settings: FilterSettings, *, format_name: str = "format",
           verdicts: Optional[Sequence[Optional[bool]]] = None) -> tuple[list[int], list[Optional[str]]]:
    """(indices kept, reason per sample: None for kept ones) for one prompt's samples."""
    reasons: list[Optional[str]] = []
    kept: list[int] = []
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        reason = rejection_reason(sample, settings, format_name=format_name,
                                  judged=None if verdicts is None else verdicts[i])
        key = " ".join(sample["completion"].split())
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= settings.max_per_prompt:
            reason = "over limit"
        if reason is None:
            kept.append(i)
            seen.add(key)
        reasons.append(reason)
    return kept, reasons


__all__ = ["FilterSettings", "REASONS", "rejection_reason", "runaway_repetition", "select"]
