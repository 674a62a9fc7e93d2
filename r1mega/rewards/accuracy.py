"""Math accuracy: the completion's final answer against the gold answer, through math-verify.

Extraction (ours): the final answer is
  1. the content of the last complete ``<answer>...</answer>`` block (R1-Zero format); if that
     content holds a ``\\boxed{}``/``\\fbox{}``, the last one inside it;
  2. otherwise the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` anywhere (R1 format:
     the summary ends with the boxed answer), nested braces handled, ``\\{`` ``\\}`` not counted
     as groups, an unclosed (truncated) box ignored;
  3. otherwise there is no answer and the reward is 0.
Only the last answer counts, so several boxed answers cannot hedge. ``\\boxed 5`` without
braces is not recognised. An answer block should hold the answer alone: its text is read as
LaTeX, so prose such as "It is 7" does not score (math-verify still finds "The answer is 7").

Equivalence (math-verify's): both answers are parsed by ``math_verify.parse`` and compared by
``math_verify.verify(gold, pred)`` (gold first: the comparison is not symmetric). An answer with
no math delimiters (``$``, ``\\(``, ``\\[``; an escaped ``\\$`` is a dollar sign) is wrapped in
``$...$`` so math-verify reads it as LaTeX. The only normalisation of ours removes space-like
thousands separators from a plain number ("1 000", "1\\,000" -> "1000"), which math-verify
would read as a product (1*0); it handles commas itself. Everything else (units, percentages, ``\\dfrac``, intervals, sets) is math-verify's
decision; see tests/test_rewards_accuracy.py for what it accepts.

Time bound: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in
the main thread of the main interpreter. :func:`math_accuracy` passes ``timeout_s`` there and runs
without math-verify's alarm in any other thread (where ``signal.alarm`` would raise). The hard
bound is :class:`~r1mega.rewards.pool.RewardPool`, which runs each reward in the main thread of a
worker process under a deadline and kills the worker when a computation (e.g. a sympy big-integer
power that ignores signals) overruns it.
"""

from __future__ import annotations

import functools
import math
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from r1mega.rewards.base import RewardOutput, check_completion, last_tag_block
from r1mega.utils.latex import last_boxed

# math-verify's default pair: LaTeX (with its normalisation of units, \dfrac, \text, ...), then
# plain expressions such as 1/2. We hand it the already-extracted answer; a box math-verify still
# finds in it (a gold "\boxed{..}" inside $...$) is preferred over the surrounding text.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # $ (not \$, a dollar sign), \( or \[
# A plain number with space-like thousands separators: 1 000 / 1\,000 / 1~000 / 1\ 000.
_SPACED_THOUSANDS = re.compile(r"^-?\d{1,3}(?:(?: |\\,|\\ |~|\\;|\\:|\\!|\\thinspace )\d{3})+(?:\.\d+)?$")
_SPACE_SEPARATOR = re.compile(r" |\\,|\\ |~|\\;|\\:|\\!|\\thinspace ")
_INFO_CHARS = 200


class GoldAnswerError(ValueError):
    """The gold answer of a record cannot be parsed by math-verify; the message names it."""


def extract_final_answer(completion: str) -> tuple[str | None, str | None]:
    """``(answer, source)``: the final answer text and where it came from.

    source is "answer_tag" (last ``<answer>`` block), "boxed" (last box) or None with answer
    None when the completion has no final answer. See the module docstring for the rules.
    """
    block = last_tag_block(completion, "<answer>", "</answer>")
    if block is not None:
        boxed = last_boxed(block)
        answer = boxed if boxed is not None else block
        return (answer.strip() or None), ("answer_tag" if answer.strip() else None)
    boxed = last_boxed(completion)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    return None, None


def _as_latex(answer: str) -> str:
    """The answer as math-verify input: a math-delimited string."""
    answer = answer.strip()
    if _SPACED_THOUSANDS.match(answer):
        answer = _SPACE_SEPARATOR.sub("", answer)
    if _MATH_DELIMITER.search(answer):
        return answer
    return f"${answer}$"


def _alarm_seconds(timeout_s: float) -> int | None:
    """math-verify's timeout argument: whole seconds, or None where signal.alarm is unusable."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(timeout_s))


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str, alarm: int | None) -> tuple:
    boxed = last_boxed(gold)
    text = boxed if boxed is not None else gold
    if not text.strip():
        raise GoldAnswerError(f"gold answer {gold!r} is empty")
    parsed = parse(_as_latex(text), extraction_config=_EXTRACTION, fallback_mode="no_fallback",
                   parsing_timeout=alarm)
    if not parsed:
        raise GoldAnswerError(f"gold answer {gold!r} cannot be parsed by math-verify "
                              "(or parsing it timed out)")
    return tuple(parsed)


def parse_gold(gold: str, *, timeout_s: float = 5.0) -> list:
    """math-verify's parse of a gold answer (cached per process).

    ``gold`` is LaTeX or plain text, with or without ``$...$``; a ``\\boxed{}`` in it is
    unwrapped. Raises GoldAnswerError (a ValueError) naming ``gold`` when it is not a non-empty
    str or math-verify extracts nothing from it. Datasets can call this to validate answers on
    load.
    """
    if not isinstance(gold, str):
        raise GoldAnswerError(f"gold answer must be a str, got {type(gold).__name__} {gold!r}")
    return list(_parse_gold_cached(gold, _alarm_seconds(timeout_s)))


def math_accuracy_detailed(completion: str, gold: str, *, timeout_s: float = 5.0) -> RewardOutput:
    """:func:`math_accuracy` with diagnostics: ``info`` has the extracted ``answer`` (cut to 200
    characters), its ``source`` ("answer_tag", "boxed" or None) and, when the value is 0, a
    ``reason`` ("no answer", "unparseable answer", "not equivalent")."""
    check_completion(completion)
    gold_parsed = parse_gold(gold, timeout_s=timeout_s)  # first: a bad gold raises, never scores
    answer, source = extract_final_answer(completion)
    info = {"answer": None if answer is None else answer[:_INFO_CHARS], "source": source}
    if answer is None:
        return RewardOutput(0.0, {**info, "reason": "no answer"})
    alarm = _alarm_seconds(timeout_s)
    pred = parse(_as_latex(answer), extraction_config=_EXTRACTION, fallback_mode="no_fallback",
                 parsing_timeout=alarm)
    if not pred:
        return RewardOutput(0.0, {**info, "reason": "unparseable answer"})
    if verify(gold_parsed, pred, timeout_seconds=alarm):
        return RewardOutput(1.0, info)
    return RewardOutput(0.0, {**info, "reason": "not equivalent"})


def equivalent_answers(a: str, b: str, *, timeout_s: float = 5.0) -> bool:
    """Whether two extracted final answers are the same value by math-verify (for majority votes);
    False when either cannot be parsed."""
    if a.strip() == b.strip():
        return True
    alarm = _alarm_seconds(timeout_s)
    pa = parse(_as_latex(a), extraction_config=_EXTRACTION, fallback_mode="no_fallback", parsing_timeout=alarm)
    pb = parse(_as_latex(b), extraction_config=_EXTRACTION, fallback_mode="no_fallback", parsing_timeout=alarm)
    return bool(pa and pb and verify(pa, pb, timeout_seconds=alarm))


def math_accuracy(completion: str, gold: str, *, timeout_s: float = 5.0) -> float:
    """1.0 if the completion's final answer is equivalent to ``gold`` per math-verify, else 0.0.

    Args:
        completion: the decoded completion (special tokens stripped).
        gold: the gold answer, LaTeX or plain text (see :func:`parse_gold`).
        timeout_s: math-verify's parsing and comparison bound, rounded up to whole seconds;
            only effective in the main thread (see the module docstring).

    Raises:
        GoldAnswerError: ``gold`` cannot be parsed. A bad gold answer never scores 1.
    """
    return math_accuracy_detailed(completion, gold, timeout_s=timeout_s).value
