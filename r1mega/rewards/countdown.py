"""Countdown reward (TinyZero's task): reach the target with the given numbers and + - * /.

The record holds the target in ``record.answer`` (an integer as text) and the numbers in
``record.meta["numbers"]``. The completion's expression is the content of its last
``<answer>...</answer>`` block.

Rules:
* Each given number is used exactly once (TinyZero's rule; ``use_all=False`` relaxes it to "at
  most once", the classic game's rule). A number given twice may be used twice.
* Only integer literals, binary ``+ - * /`` and parentheses; ``×``, ``÷`` and ``−`` are read as
  ``* / -``. No unary minus (it is not one of the four operations), no ``**``, no names, calls
  or anything else: the expression is parsed with ``ast`` and walked, never evaluated, so
  ``__import__('os')`` scores 0 without running.
* The value is computed exactly with fractions.Fraction and must equal the target; division by
  zero scores 0. Nothing but the expression may be in the answer block (no "= 24").
* 1.0 or 0.0, no partial credit: the format reward is separate (TinyZero gives 0.1 for a
  well-formed wrong answer inside this reward instead).
"""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

from r1mega.data.records import PromptRecord
from r1mega.rewards.base import RewardOutput, check_completion, check_record, last_tag_block

MAX_EXPRESSION_CHARS = 500  # far above any real solution; bounds parsing work on junk
_OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__,
              ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}
_UNICODE_OPERATORS = str.maketrans({"×": "*", "÷": "/", "−": "-", "⋅": "*"})


class _Invalid(Exception):
    """The expression breaks a rule; the message says which."""


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    Raises ValueError (with the reason) for anything but integer literals, binary + - * /
    and parentheses, for division by zero, and for expressions over MAX_EXPRESSION_CHARS.
    """
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a str, got {type(expression).__name__}")
    expression = expression.translate(_UNICODE_OPERATORS).strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not a Python expression: {type(e).__name__}") from None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise _Invalid("division by zero")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise _Invalid(f"{type(node).__name__} is not allowed")

    try:
        return walk(tree.body), used
    except _Invalid as e:
        raise ValueError(str(e)) from None
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def _record_task(record: PromptRecord) -> tuple[Fraction, list[int]]:
    try:
        target = Fraction(str(record.answer).strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"record {record.id!r}: record.answer must be the integer target, "
                         f"got {record.answer!r}") from None
    numbers = record.meta.get("numbers")
    if (not isinstance(numbers, (list, tuple)) or not numbers
            or not all(type(n) is int for n in numbers)):
        raise ValueError(f"record {record.id!r}: record.meta['numbers'] must be a non-empty list "
                         f"of ints, got {numbers!r}")
    return target, list(numbers)


def countdown_reward_detailed(completion: str, record: PromptRecord, *, use_all: bool = True
                              ) -> RewardOutput:
    """:func:`countdown_reward` with the ``expression`` and, when 0, the ``reason`` in ``info``."""
    check_completion(completion)
    target, numbers = _record_task(check_record(record))
    expression = last_tag_block(completion, "<answer>", "</answer>")
    if expression is None or not expression.strip():
        return RewardOutput(0.0, {"expression": None, "reason": "no answer"})
    info = {"expression": expression.strip()[:200]}
    try:
        value, used = evaluate_expression(expression)
    except ValueError as e:
        return RewardOutput(0.0, {**info, "reason": f"invalid expression: {e}"})
    if use_all:
        if sorted(used) != sorted(numbers):
            return RewardOutput(0.0, {**info, "reason": "must use each number exactly once"})
    elif Counter(used) - Counter(numbers):
        return RewardOutput(0.0, {**info, "reason": "uses a number not given or too often"})
    if value != target:
        return RewardOutput(0.0, {**info, "reason": "wrong value"})
    return RewardOutput(1.0, info)


def countdown_reward(completion: str, record: PromptRecord, *, use_all: bool = True) -> float:
    """1.0 if the last ``<answer>`` expression reaches ``record.answer`` using the numbers of
    ``record.meta["numbers"]`` by the rules of the module docstring, else 0.0.

    Raises ValueError (naming the record) when the record's target or numbers are malformed.
    """
    return countdown_reward_detailed(completion, record, use_all=use_all).value
