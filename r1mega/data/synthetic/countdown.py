"""Countdown (task "countdown"), as in TinyZero: reach a target from given numbers with + - * /.

difficulty d (1..4) gives d + 2 numbers, each in 1..100 (repeats allowed). A problem is made by
combining the numbers in random order into a random expression tree, each number used exactly
once, every intermediate result a positive integer (so division is exact; evaluated with
fractions.Fraction), until the value is a target in 1..100 (d <= 2) or 1..1000 (d >= 3). That
expression is a known solution: ``meta["solution"]``, written with ASCII operators and only the
parentheses it needs, e.g. ``(25 - 5) * 4 + 1``.

Records: ``answer`` is the target as a string, ``meta["numbers"]`` the numbers in the order the
prompt shows them. The prompt is TinyZero's wording; the canonical key is the sorted numbers and
the target.
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction

from r1mega.data.records import PromptRecord
from r1mega.data.synthetic.common import check_args, check_record, problem_id, render, sample_problems

NAME = "countdown"
TASK = "countdown"
DIFFICULTIES = range(1, 5)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
# Random tree building favours + and - so targets stay in range more often.
_OP_WEIGHTS = (("+", 3), ("-", 3), ("*", 2), ("/", 2))

PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
          "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work "
          "in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
          "example <answer> (1 + 2) / 3 </answer>.")


def _combine(op: str, a: tuple, b: tuple) -> tuple | None:
    """(value, text, precedence) of `a op b`, or None when the result is not a positive integer."""
    (va, ta, pa), (vb, tb, pb) = a, b
    if op == "+":
        value = va + vb
    elif op == "-":
        value = va - vb
    elif op == "*":
        value = va * vb
    else:
        if va % vb:
            return None
        value = va // vb
    if value <= 0:
        return None
    p = _PREC[op]
    left = f"({ta})" if pa < p else ta
    right = f"({tb})" if pb < p or (pb == p and op in "-/") else tb
    return value, f"{left} {op} {right}", p


def _target_limit(difficulty: int) -> int:
    return 100 if difficulty <= 2 else 1000


def _build(rng: random.Random, numbers: list[int], limit: int) -> tuple[int, str] | None:
    items = [(x, str(x), 3) for x in numbers]
    ops, weights = zip(*_OP_WEIGHTS)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        a, b = items[i], items[j]
        for op in rng.choices(ops, weights, k=4) + ["+"]:  # "+" always works
            made = _combine(op, a, b)
            if made is None and op in "-/":
                made = _combine(op, b, a)
            if made is not None:
                break
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [made]
    value, text, _ = items[0]
    return (value, text) if 1 <= value <= limit else None


def _draw(difficulty: int):
    count = difficulty + 2
    limit = _target_limit(difficulty)

    def draw(rng: random.Random):
        while True:
            numbers = [rng.randint(1, 100) for _ in range(count)]
            built = _build(rng, numbers, limit)
            if built is not None:
                target, text = built
                key = f"{NAME}:{','.join(map(str, sorted(numbers)))}:{target}"
                return key, (numbers, target, text)
    return draw


def generate(n: int, *, seed: int, difficulty: int, split: str = "train") -> list[PromptRecord]:
    """n distinct Countdown puzzles of `split` with difficulty + 2 numbers each."""
    check_args(NAME, n, seed, difficulty, split, DIFFICULTIES)
    records = []
    for key, (numbers, target, text) in sample_problems(NAME, n, seed, difficulty, split,
                                                        _draw(difficulty)):
        records.append(PromptRecord(
            id=problem_id(NAME, difficulty, key),
            prompt=PROMPT.format(numbers=f"[{', '.join(map(str, numbers))}]", target=target),
            task=TASK,
            answer=str(target),
            language="en",
            meta={"generator": f"r1mega.data.synthetic.{NAME}", "difficulty": difficulty,
                  "split": split, "numbers": list(numbers), "target": target, "solution": text},
        ))
    return records


# --- solutions -----------------------------------------------------------------------------------

def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def evaluate_steps(expr: str) -> tuple[Fraction, list[tuple[str, str, str, Fraction]], list[int]]:
    """Evaluate an expression of integers, + - * / and parentheses exactly.

    Returns (value, steps [(left, op, right, result)] in evaluation order, numbers used).
    Raises ValueError for anything else (names, calls, unary minus, floats, division by zero).
    """
    steps: list[tuple[str, str, str, Fraction]] = []
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = walk(node.left), walk(node.right)
            op = _AST_OPS[type(node.op)]
            if op == "/" and b == 0:
                raise ValueError(f"division by zero in {expr!r}")
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            steps.append((_fmt(a), op, _fmt(b), value))
            return value
        raise ValueError(f"{expr!r}: only integers, + - * / and parentheses are allowed")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"{expr!r} is not an arithmetic expression") from None
    return walk(tree.body), steps, used


def solution(record: PromptRecord, style: str = "r1") -> str:
    """A correct completion for a countdown record built from its meta["solution"] expression."""
    meta = check_record(record, TASK, NAME, "numbers", "solution")
    numbers, expr = list(meta["numbers"]), meta["solution"]
    target = Fraction(int(record.answer))
    value, steps, used = evaluate_steps(expr)
    if value != target or sorted(used) != sorted(numbers):
        raise ValueError(f"{NAME}.solution: record {record.id!r}: meta['solution'] {expr!r} does not "
                         f"reach {record.answer} using each of {numbers} exactly once")
    listed = ", ".join(map(str, numbers))
    lines = [f"I need to reach {record.answer} using each of the numbers {listed} exactly once, "
             "with +, -, * and /."]
    for k, (a, op, b, result) in enumerate(steps):
        lead = "First" if k == 0 else "Finally" if k == len(steps) - 1 else "Next"
        tail = ", which is the target" if k == len(steps) - 1 else ""
        lines.append(f"{lead}, {a} {op} {b} = {_fmt(result)}{tail}.")
    lines.append(f"Check: {expr} = {record.answer}, and it uses {listed}, each exactly once.")
    summary = (f"The equation {expr} = {record.answer} uses each number exactly once.\n\n"
               f"<answer> {expr} </answer>")
    return render(style, "\n".join(lines), summary, expr)
