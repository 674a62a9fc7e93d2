"""Multi-digit arithmetic (task "math"): addition, subtraction, multiplication, exact division.

difficulty d (1..20) is the number of digits of each operand: addition adds 2 numbers of d digits
(3 numbers from d = 3, 4 from d = 5), subtraction takes two d-digit numbers (the result may be
negative), multiplication two d-digit numbers, and division divides a product of a d-digit quotient
and a ceil(d/2)-digit divisor by that divisor, so the answer is always an integer.

The answer is the integer's decimal string. Solutions work the way a person does on paper: column
addition with carries, column subtraction with borrows, long multiplication by partial products,
and long division digit by digit; every equality written in them is true.
"""

from __future__ import annotations

import random

from r1mega.data.records import PromptRecord
from r1mega.data.synthetic.common import check_args, check_record, problem_id, render, sample_problems

NAME = "arithmetic"
TASK = "math"
DIFFICULTIES = range(1, 21)
OPS = ("add", "sub", "mul", "div")
_SYMBOL = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}
_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands",
           "millions", "ten-millions", "hundred-millions", "billions")


def _place(i: int, noun: str = "place") -> str:
    return f"{_PLACES[i] if i < len(_PLACES) else f'10^{i}'} {noun}"


def _digits(rng: random.Random, d: int, low: int = 0) -> int:
    return rng.randint(max(low, 10 ** (d - 1) if d > 1 else 0), 10 ** d - 1)


def _draw(difficulty: int):
    def draw(rng: random.Random):
        op = rng.choice(OPS)
        d = difficulty
        if op == "add":
            k = 2 if d <= 2 else 3 if d <= 4 else 4
            operands = sorted((_digits(rng, d) for _ in range(k)), reverse=True)
        elif op == "sub":
            operands = [_digits(rng, d), _digits(rng, d)]
        elif op == "mul":
            operands = sorted((_digits(rng, d, low=2), _digits(rng, d, low=2)), reverse=True)
        else:
            divisor = _digits(rng, (d + 1) // 2, low=2)
            operands = [_digits(rng, d, low=1) * divisor, divisor]
        return f"{NAME}:{op}:{','.join(map(str, operands))}", (op, operands)
    return draw


def evaluate(op: str, operands: list[int]) -> int:
    if op == "add":
        return sum(operands)
    if op == "sub":
        return operands[0] - operands[1]
    if op == "mul":
        return operands[0] * operands[1]
    if op == "div":
        q, r = divmod(operands[0], operands[1])
        if r:
            raise ValueError(f"{operands[0]} is not divisible by {operands[1]}")
        return q
    raise ValueError(f"unknown op {op!r}")


def expression(op: str, operands: list[int]) -> str:
    return f" {_SYMBOL[op]} ".join(map(str, operands))


def generate(n: int, *, seed: int, difficulty: int, split: str = "train") -> list[PromptRecord]:
    """n distinct arithmetic problems of `split` (see the module docstring for `difficulty`)."""
    check_args(NAME, n, seed, difficulty, split, DIFFICULTIES)
    records = []
    for key, (op, operands) in sample_problems(NAME, n, seed, difficulty, split, _draw(difficulty)):
        records.append(PromptRecord(
            id=problem_id(NAME, difficulty, key),
            prompt=f"What is {expression(op, operands)}?",
            task=TASK,
            answer=str(evaluate(op, operands)),
            language="en",
            meta={"generator": f"r1mega.data.synthetic.{NAME}", "difficulty": difficulty,
                  "split": split, "op": op, "operands": list(operands)},
        ))
    return records


# --- step-by-step solutions -------------------------------------------------------------------------

def _digit(x: int, i: int) -> int:
    return x // 10 ** i % 10


def _add_steps(operands: list[int]) -> list[str]:
    width = max(len(str(x)) for x in operands)
    lines = [f"Add {expression('add', operands)} column by column, starting from the ones place "
             "and carrying the tens of each column sum into the next column."]
    carry = 0
    for i in range(width):
        terms = [_digit(x, i) for x in operands if i < len(str(x))] + ([carry] if carry else [])
        s = sum(terms)
        note = f" (including the carry {carry})" if carry else ""
        if len(terms) == 1:
            lines.append(f"{_place(i).capitalize()}: only {s}{note}; write {s % 10}, carry {s // 10}.")
        else:
            lines.append(f"{_place(i).capitalize()}: {' + '.join(map(str, terms))} = {s}{note}; "
                         f"write {s % 10}, carry {s // 10}.")
        carry = s // 10
    if carry:
        lines.append(f"The final carry {carry} goes in front.")
    total = sum(operands)
    lines.append(f"Reading the digits gives {total}, so {expression('add', operands)} = {total}.")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:
    lines = []
    if a < b:
        lines.append(f"Since {a} < {b}, the result is negative: compute {b} - {a} and put a minus "
                     "sign in front.")
        a, b, sign = b, a, -1
    else:
        sign = 1
    lines.append(f"Subtract {b} from {a} column by column from the ones place, borrowing when needed.")
    borrow = 0
    for i in range(len(str(a))):
        top, bottom = _digit(a, i), _digit(b, i)
        text = f"{_place(i).capitalize()}: "
        if borrow:
            text += f"after lending 1, the {top} becomes {top} - 1 = {top - 1}; "
            top -= 1
        if top < bottom:
            text += (f"{top} is less than {bottom}, so borrow 1 from the next place: "
                     f"{top + 10} - {bottom} = {top + 10 - bottom}; write {top + 10 - bottom}.")
            borrow = 1
        else:
            text += f"{top} - {bottom} = {top - bottom}; write {top - bottom}."
            borrow = 0
        lines.append(text)
    diff = a - b
    lines.append(f"Reading the digits gives {diff}, so {a} - {b} = {diff}.")
    if sign < 0:
        lines.append(f"With the minus sign, {b} - {a} = {-diff}.")
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    lines = [f"Multiply {a} by each digit of {b}, starting from the ones digit, shifting each partial "
             "product by the digit's place, then add the partial products."]
    partials = []
    for i in range(len(str(b))):
        digit = _digit(b, i)
        if digit == 0:
            lines.append(f"The {_place(i, 'digit')} of {b} is 0, so it adds nothing.")
            continue
        p = a * digit
        if i == 0:
            lines.append(f"Ones digit {digit}: {a} × {digit} = {p}.")
        else:
            lines.append(f"{_place(i, 'digit').capitalize()} {digit}: {a} × {digit} = {p}, "
                         f"shifted {i} place{'s' if i > 1 else ''}: {p * 10 ** i}.")
        partials.append(p * 10 ** i)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"Running sum: {total} + {p} = {total + p}.")
        total += p
    lines.append(f"So {a} × {b} = {total}.")
    return lines


def _div_steps(a: int, b: int) -> list[str]:
    lines = [f"Divide {a} by {b} with long division, bringing down one digit at a time."]
    rem = 0
    quotient_digits = []
    for i, ch in enumerate(str(a)):
        cur = rem * 10 + int(ch)
        q = cur // b
        lead = f"{'Start with' if i == 0 else 'Bring down'} {ch}: the current number is {cur}"
        if q == 0:
            lines.append(f"{lead}, smaller than {b}, so the quotient digit is 0.")
        else:
            lines.append(f"{lead}. {b} × {q} = {b * q} fits and {b} × {q + 1} = {b * (q + 1)} is too big, "
                         f"so the quotient digit is {q}; the remainder is {cur} - {b * q} = {cur - b * q}.")
        quotient_digits.append(q)
        rem = cur - b * q
    quotient = int("".join(map(str, quotient_digits)))
    lines.append(f"The quotient digits read {''.join(map(str, quotient_digits))}, that is {quotient}, "
                 f"with remainder {rem}.")
    lines.append(f"Check: {quotient} × {b} = {quotient * b}, so {a} ÷ {b} = {quotient}.")
    return lines


def steps(op: str, operands: list[int]) -> list[str]:
    """The worked reasoning for one problem, one step per line."""
    if op == "add":
        return _add_steps(operands)
    if op == "sub":
        return _sub_steps(*operands)
    if op == "mul":
        return _mul_steps(*operands)
    if op == "div":
        return _div_steps(*operands)
    raise ValueError(f"unknown op {op!r}")


def solution(record: PromptRecord, style: str = "r1") -> str:
    """A correct step-by-step completion for an arithmetic record, in the R1 or R1-Zero format."""
    meta = check_record(record, TASK, NAME, "op", "operands")
    op, operands = meta["op"], list(meta["operands"])
    answer = evaluate(op, operands)
    if str(answer) != record.answer:
        raise ValueError(f"{NAME}.solution: record {record.id!r}: answer {record.answer!r} does not "
                         f"match its operands ({answer})")
    reasoning = "\n".join(steps(op, operands))
    summary = f"{expression(op, operands)} = {answer}.\n\nThe answer is \\boxed{{{answer}}}."
    return render(style, reasoning, summary, str(answer))
