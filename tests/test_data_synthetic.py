"""r1mega.data.synthetic: determinism, disjoint held-out splits, correct answers and solutions.

Correctness is checked independently of the generators: arithmetic answers against Python's
integers, countdown solutions with a Fraction evaluator written here, every "a op b = c" written
in a worked solution is re-evaluated, and the reference programs are run against their tests.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from r1mega.data import PromptRecord, load_prompts, write_prompts
from r1mega.data.synthetic import (HELD_OUT_PERCENT, TASKS_BY_NAME, get_task, split_of, write_sft,
                                   write_task)
from r1mega.data.synthetic import programming

NAMES = sorted(TASKS_BY_NAME)
R1 = re.compile(r"<think>\n(?P<think>.+)\n</think>\n\n(?P<summary>.+)", re.S)
R1_ZERO = re.compile(r"<think>\n(?P<think>.+)\n</think> <answer>(?P<answer>.+)</answer>", re.S)


def canonical(record: PromptRecord):
    """The problem's identity, computed here from the record (not the generator's key)."""
    m = record.meta
    if record.task == "math":
        operands = sorted(m["operands"]) if m["op"] in ("add", "mul") else m["operands"]
        return ("arith", m["op"], tuple(operands))
    if record.task == "countdown":
        return ("countdown", tuple(sorted(m["numbers"])), record.answer)
    return ("code", m["family"], json.dumps(m["params"], sort_keys=True))


def fraction_eval(expr: str) -> tuple[Fraction, list[int]]:
    """Evaluate + - * / over integer literals exactly; returns (value, literals used)."""
    used = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: a / b}
            return ops[type(node.op)]()
        raise AssertionError(f"unexpected {ast.dump(node)} in {expr!r}")

    return walk(ast.parse(expr, mode="eval").body), used


_EQ = re.compile(r"([0-9()][0-9 +\-*/×÷()]*?)\s=\s(-?\d+)")


def check_equalities(text: str) -> int:
    """Every 'expr = n' in the text (expr of integers, + - * / × ÷ and parentheses) holds."""
    checked = 0
    for m in _EQ.finditer(text):
        expr = m.group(1).replace("×", "*").replace("÷", "/").strip()
        while expr.count("(") > expr.count(")"):  # a sentence may open a parenthesis earlier
            expr = expr[expr.index("(") + 1:].strip()
        value, _ = fraction_eval(expr)
        assert value == int(m.group(2)), f"false step {m.group(0)!r} in:\n{text}"
        checked += 1
    return checked


# --- generic properties -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_prefix_stable(name):
    gen = get_task(name).generate
    a = gen(40, seed=3, difficulty=2)
    assert a == gen(40, seed=3, difficulty=2)
    assert gen(15, seed=3, difficulty=2) == a[:15]
    assert a != gen(40, seed=4, difficulty=2)
    assert len({r.id for r in a}) == 40
    assert gen(0, seed=3, difficulty=2) == []


@pytest.mark.parametrize("name", NAMES)
def test_held_out_split_never_overlaps_train(name):
    spec = get_task(name)
    difficulty = spec.difficulties[1]
    train = [r for seed in (0, 1) for r in spec.generate(150, seed=seed, difficulty=difficulty)]
    test = [r for seed in (0, 1) for r in spec.generate(15, seed=seed, difficulty=difficulty, split="test")]
    assert {canonical(r) for r in train}.isdisjoint(canonical(r) for r in test)
    assert {r.id for r in train}.isdisjoint(r.id for r in test)
    assert all(r.meta["split"] == "train" for r in train) and all(r.meta["split"] == "test" for r in test)


def test_held_out_share():
    share = Counter(split_of(f"k{i}") for i in range(20_000))["test"] / 20_000
    assert abs(share - HELD_OUT_PERCENT / 100) < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_records_round_trip_through_jsonl(tmp_path, name):
    spec = get_task(name)
    for difficulty in spec.difficulties[:3]:
        records = spec.generate(20, seed=0, difficulty=difficulty)
        assert all(r.task == spec.task and r.language == "en" for r in records)
        write_prompts(tmp_path / "d.jsonl", records)
        assert load_prompts(tmp_path / "d.jsonl") == records


@pytest.mark.parametrize("name", NAMES)
def test_solution_formats(name):
    spec = get_task(name)
    for record in spec.generate(10, seed=1, difficulty=spec.difficulties[1]):
        r1 = spec.solution(record, style="r1")
        zero = spec.solution(record, style="r1-zero")
        m, z = R1.fullmatch(r1), R1_ZERO.fullmatch(zero)
        assert m and z, (r1, zero)
        for text in (r1, zero):
            assert text.count("<think>") == 1 and text.count("</think>") == 1
        assert m.group("think") == z.group("think")
        if name == "arithmetic":
            assert m.group("summary").endswith(f"\\boxed{{{record.answer}}}.")
            assert z.group("answer").strip() == record.answer
        elif name == "countdown":
            assert m.group("summary").endswith(f"<answer> {record.meta['solution']} </answer>")
            assert z.group("answer").strip() == record.meta["solution"]
        else:
            assert m.group("summary").rstrip().endswith("```")
            assert "```python\n" in z.group("answer")


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"unknown synthetic task 'countdwn'.*did you mean 'countdown'"):
        get_task("countdwn")
    with pytest.raises(ValueError, match=r"countdown: difficulty=9 must be an integer in 1\.\.4"):
        get_task("countdown").generate(1, seed=0, difficulty=9)
    with pytest.raises(ValueError, match="split='dev' is not one of"):
        get_task("arithmetic").generate(1, seed=0, difficulty=1, split="dev")
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        get_task("programming").generate(1, seed=-1, difficulty=1)
    record = get_task("arithmetic").generate(1, seed=0, difficulty=1)[0]
    with pytest.raises(ValueError, match="style='r2' is not one of"):
        get_task("arithmetic").solution(record, style="r2")
    with pytest.raises(ValueError, match="has task 'math', not 'countdown'"):
        get_task("countdown").solution(record)
    with pytest.raises(ValueError, match="found only .* distinct 'test' problems at difficulty 1"):
        get_task("arithmetic").generate(500, seed=0, difficulty=1, split="test")


def test_write_task_and_write_sft(tmp_path):
    records = write_task("countdown", tmp_path / "cd.jsonl", 12, seed=4, difficulty=1, split="test")
    assert load_prompts(tmp_path / "cd.jsonl") == records
    assert all(r.meta["split"] == "test" for r in records)
    rows = write_sft("arithmetic", tmp_path / "sft.jsonl", 8, seed=2, difficulty=3, style="r1-zero")
    lines = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert lines == rows and len(rows) == 8
    spec = get_task("arithmetic")
    expected = spec.generate(8, seed=2, difficulty=3)  # the train split by default
    assert [set(r) for r in rows] == [{"prompt", "completion"}] * 8
    assert [r["prompt"] for r in rows] == [e.prompt for e in expected]
    assert [r["completion"] for r in rows] == [spec.solution(e, style="r1-zero") for e in expected]


# --- arithmetic -------------------------------------------------------------------------------------

def test_arithmetic_answers_and_worked_steps():
    spec = get_task("arithmetic")
    ops = Counter()
    for difficulty in (1, 2, 3, 5, 8, 12):
        for record in spec.generate(40, seed=difficulty, difficulty=difficulty):
            op, operands = record.meta["op"], record.meta["operands"]
            ops[op] += 1
            a, b = operands[0], operands[1]
            if op == "div":
                assert a % b == 0
                truth = a // b
            else:
                truth = {"add": sum(operands), "sub": a - b, "mul": a * b}[op]
            assert record.answer == str(truth)
            assert all(len(str(x)) == difficulty for x in (operands if op != "div" else [a // b]))
            text = spec.solution(record)
            assert check_equalities(text) >= 2
            assert text.endswith(f"\\boxed{{{truth}}}.")
    assert set(ops) == {"add", "sub", "mul", "div"}


# --- countdown --------------------------------------------------------------------------------------

def test_countdown_puzzles_are_solvable_as_stored():
    spec = get_task("countdown")
    allowed = re.compile(r"^[\d+\-*/().\s]+$")  # TinyZero's check on the answer text
    for difficulty in spec.difficulties:
        targets = []
        for record in spec.generate(60, seed=difficulty, difficulty=difficulty):
            numbers, expr = record.meta["numbers"], record.meta["solution"]
            assert len(numbers) == difficulty + 2 and all(1 <= x <= 100 for x in numbers)
            value, used = fraction_eval(expr)
            assert value == int(record.answer) and Counter(used) == Counter(numbers), record
            assert allowed.match(expr)
            assert record.prompt == (
                f"Using the numbers [{', '.join(map(str, numbers))}], create an equation that equals "
                f"{record.answer}. You can use basic arithmetic operations (+, -, *, /) and each number "
                "can only be used once. Show your work in <think> </think> tags. And return the final "
                "answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.")
            for style in ("r1", "r1-zero"):
                text = spec.solution(record, style=style)
                answer = re.findall(r"<answer>(.*?)</answer>", text, re.S)[-1].strip()
                assert fraction_eval(answer)[0] == int(record.answer)
                assert check_equalities(text) >= len(numbers)
            targets.append(int(record.answer))
        assert 1 <= min(targets) and max(targets) <= (100 if difficulty <= 2 else 1000)
        assert len(set(targets)) > 20


def test_countdown_solution_refuses_a_wrong_expression():
    spec = get_task("countdown")
    record = spec.generate(1, seed=0, difficulty=1)[0]
    numbers = record.meta["numbers"]
    wrong = " + ".join(map(str, numbers[:2]))
    bad = dataclasses.replace(record, meta={**record.meta, "solution": wrong})
    with pytest.raises(ValueError, match="does not reach"):
        spec.solution(bad)


# --- programming ------------------------------------------------------------------------------------

def last_python_block(text: str) -> str:
    return re.findall(r"```python\n(.*?)```", text, re.S)[-1]


def run_tests(code: str, tests) -> None:
    asserts = [t["assert"] for t in tests if "assert" in t]
    if asserts:  # one process runs the program and then all its assert lines
        proc = subprocess.run([sys.executable, "-c", code + "\n" + "\n".join(asserts) + "\n"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{proc.stderr}\n--- program:\n{code}\n--- asserts:\n{asserts}"
    for t in tests:
        if "input" in t:
            proc = subprocess.run([sys.executable, "-c", code], input=t["input"], capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.rstrip() == t["output"].rstrip(), f"{code}\n--- input:\n{t['input']}"


def _family_records(difficulty: int):
    """One record per family, built directly so every family is covered whatever the split."""
    rng = random.Random(difficulty)
    for family in programming.FAMILIES.values():
        params = family.sample(rng)
        yield PromptRecord(
            id=family.name, prompt=family.prompt(params), task="code",
            tests=family.tests(random.Random(family.name), difficulty, params),
            meta={"family": family.name, "params": params})


def test_every_family_reference_program_passes_its_tests():
    spec = get_task("programming")
    records = list(_family_records(3))
    assert len(records) == 16
    for record in records:
        assert len(record.tests) >= 3
        run_tests(last_python_block(spec.solution(record, style="r1")), record.tests)


def test_generated_programs_pass_and_levels_grow():
    spec = get_task("programming")
    levels = {name: f.level for name, f in programming.FAMILIES.items()}
    for difficulty in spec.difficulties:
        records = spec.generate(30, seed=7, difficulty=difficulty)
        assert max(levels[r.meta["family"]] for r in records) == difficulty
        assert all(levels[r.meta["family"]] <= difficulty for r in records)
    for record in spec.generate(3, seed=11, difficulty=2, split="test"):
        run_tests(last_python_block(spec.solution(record, style="r1-zero")), record.tests)
