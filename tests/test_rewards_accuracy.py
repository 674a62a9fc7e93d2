"""Math accuracy (answer extraction + math-verify equivalence), countdown, and the "accuracy"
registry dispatch.

The equivalence table records what math-verify 0.9 decides; where that differs from the
mathematical truth the row says so in a comment (we do not second-guess math-verify).
"""

from __future__ import annotations

import threading
import time

import pytest

from r1mega.data.records import PromptRecord
from r1mega.rewards import (
    GoldAnswerError,
    countdown_reward,
    countdown_reward_detailed,
    evaluate_expression,
    extract_final_answer,
    get_reward,
    last_boxed,
    math_accuracy,
    math_accuracy_detailed,
    parse_gold,
)


def boxed(answer: str) -> str:
    return f"<think>some reasoning</think>\nSo the result is \\boxed{{{answer}}}."


# (gold, predicted answer, math-verify's verdict)
EQUIVALENCE = [
    # integers, with and without thousands separators
    ("1000", "1000", 1.0),
    ("1000", "1,000", 1.0),
    ("1,000", "1000", 1.0),
    ("1000000", "1,000,000", 1.0),
    ("1000", "1{,}000", 1.0),
    ("1000", "1 000", 1.0),  # by our normalisation: math-verify alone reads "1 000" as 1*0
    ("1000", "1\\,000", 1.0),  # likewise
    ("1000", "1000.0", 1.0),
    ("1000", "999", 0.0),
    # negative numbers
    ("-3", "-3", 1.0),
    ("-3", "3", 0.0),
    ("-\\frac{3}{4}", "-0.75", 1.0),
    # fractions: \frac, \dfrac, \tfrac, a/b, decimals
    ("\\frac{1}{2}", "\\dfrac{1}{2}", 1.0),
    ("\\frac{1}{2}", "\\tfrac12", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{3}{2}", "1\\frac{1}{2}", 1.0),  # mixed number
    ("\\frac{1}{3}", "0.333333", 1.0),  # equal after rounding to 6 decimals (float_rounding=6)
    ("\\frac{1}{3}", "0.333", 0.0),  # too few digits
    ("\\frac{1}{2}", "\\frac{2}{3}", 0.0),
    # radicals
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", 1.0),
    ("\\sqrt{2}", "1.414", 0.0),
    # pi
    ("\\pi", "\\pi", 1.0),
    ("2\\pi", "2π", 1.0),
    ("\\frac{\\pi}{4}", "\\dfrac{\\pi}{4}", 1.0),
    ("\\pi", "3.14159", 0.0),  # a decimal approximation of pi is not pi
    # intervals
    ("(1,2]", "(1, 2]", 1.0),
    ("(1,2]", "[1,2]", 0.0),
    ("(-\\infty, 3)", "(-\\infty,3)", 1.0),
    # sets and tuples
    ("\\{1,2\\}", "\\{2,1\\}", 1.0),
    ("\\{1,2,3\\}", "1,2,3", 1.0),  # a bare list reads as a set
    ("(1,2)", "(1, 2)", 1.0),
    ("(1,2)", "(2,1)", 0.0),
    # percentages: math-verify accepts 50% == 0.5 == 50 (lenient both ways)
    ("50\\%", "50\\%", 1.0),
    ("50\\%", "0.5", 1.0),
    ("50\\%", "50", 1.0),  # mathematically 50 != 50%; math-verify accepts it
    ("0.5", "50\\%", 1.0),
    # units are dropped by math-verify's normalisation
    ("5", "5 \\text{ cm}", 1.0),
    ("5", "5\\,\\mathrm{cm}", 1.0),
    ("5", "5 cm", 1.0),
    ("5\\text{ cm}", "5", 1.0),
    ("5", "\\text{5 meters}", 0.0),  # the number inside \text{} is not read
    # currency, degrees, a trailing period
    ("10", "\\$10", 1.0),
    ("5", "5.", 1.0),
    ("30", "30^\\circ", 1.0),
    ("\\frac{\\pi}{6}", "30^\\circ", 0.0),  # degrees are not converted to radians
    # equations and expressions
    ("x=2", "2", 1.0),
    ("2", "x=2", 1.0),
    ("(x+1)^2", "x^2+2x+1", 1.0),
    # multiple-choice letters
    ("\\text{(B)}", "B", 1.0),
    ("B", "C", 0.0),
    ("A", "a", 1.0),  # math-verify lower-cases single letters
]


@pytest.mark.parametrize("gold,pred,expected", EQUIVALENCE)
def test_math_verify_equivalence(gold, pred, expected):
    assert math_accuracy(boxed(pred), gold) == expected


def test_answer_tag_forms():
    # R1-Zero: the answer block; bare LaTeX, $-delimited, or boxed inside the block.
    assert math_accuracy("<think>r</think> <answer>\\frac{1}{2}</answer>", "0.5") == 1.0
    assert math_accuracy("<think>r</think> <answer>$\\frac12$</answer>", "0.5") == 1.0
    assert math_accuracy("<think>r</think> <answer>The answer is \\boxed{7}.</answer>", "7") == 1.0
    # Prose in the block is read as LaTeX: math-verify finds "The answer is 7", not "It is 7".
    assert math_accuracy("<answer>The answer is 7</answer>", "7") == 1.0
    assert math_accuracy("<answer>It is 7</answer>", "7") == 0.0
    # The answer block wins over a box elsewhere, and the last answer block counts.
    assert math_accuracy("<think>\\boxed{6}</think><answer>5</answer>", "5") == 1.0
    assert math_accuracy("<answer>5</answer> <answer>6</answer>", "6") == 1.0
    assert math_accuracy("<answer>5</answer> <answer>6</answer>", "5") == 0.0


def test_several_boxed_answers_the_last_counts():
    text = "First \\boxed{3}, then on reflection \\boxed{4}."
    assert math_accuracy(text, "4") == 1.0
    assert math_accuracy(text, "3") == 0.0
    # No hedging through one box holding several answers either: "3, 4" is the set {3, 4}.
    assert math_accuracy("\\boxed{3, 4}", "3") == 0.0


def test_no_answer_scores_zero():
    out = math_accuracy_detailed("I think it is 42 but I am not sure.", "42")
    assert out.value == 0.0 and out.info["reason"] == "no answer"
    assert math_accuracy("", "42") == 0.0
    assert math_accuracy("\\boxed{}", "42") == 0.0
    assert math_accuracy("<answer>  </answer>", "42") == 0.0
    # A truncated box is not an answer.
    assert math_accuracy("so \\boxed{4", "4") == 0.0


def test_unparseable_answer_and_diagnostics():
    out = math_accuracy_detailed("<answer>\\frac{</answer>", "1")
    assert out.value == 0.0 and out.info["reason"] == "unparseable answer"
    out = math_accuracy_detailed(boxed("2"), "3")
    assert out.info == {"answer": "2", "source": "boxed", "reason": "not equivalent"}
    out = math_accuracy_detailed("<answer>3</answer>", "3")
    assert out.value == 1.0 and out.info == {"answer": "3", "source": "answer_tag"}


@pytest.mark.parametrize("gold", ["\\frac{", "", "   ", "$$", "}{"])
def test_unparseable_gold_raises_naming_it(gold):
    with pytest.raises(GoldAnswerError, match="gold answer") as excinfo:
        math_accuracy(boxed("1"), gold)
    assert repr(gold) in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_bad_gold_never_scores_one():
    # Even a completion that repeats the broken gold verbatim raises rather than scoring.
    with pytest.raises(GoldAnswerError):
        math_accuracy(boxed("\\frac{"), "\\frac{")
    with pytest.raises(GoldAnswerError, match="must be a str"):
        math_accuracy(boxed("1"), None)


def test_gold_forms():
    assert math_accuracy(boxed("1/2"), "$\\frac{1}{2}$") == 1.0
    assert math_accuracy(boxed("1/2"), "\\boxed{\\frac{1}{2}}") == 1.0
    assert parse_gold("\\frac{1}{2}") == parse_gold("\\boxed{\\frac{1}{2}}")


def test_last_boxed_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{\\{1,2}") == "\\{1,2"  # \{ is content, not a group
    assert last_boxed("\\fbox{7} and \\boxed {8}") == "8"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # the truncated last box is skipped
    assert last_boxed("nothing") is None
    assert extract_final_answer("<answer>\\boxed{5}</answer>") == ("5", "answer_tag")
    assert extract_final_answer("\\boxed{ 5 }") == ("5", "boxed")
    assert extract_final_answer("plain") == (None, None)


def test_works_off_the_main_thread():
    # signal.alarm cannot be used there: math-verify's own bound is skipped, not an error.
    results = []
    thread = threading.Thread(target=lambda: results.append(math_accuracy(boxed("\\dfrac{1}{2}"), "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_time_bounded_in_the_main_thread():
    start = time.monotonic()
    assert math_accuracy(boxed("9^{9^{9^{9}}}"), "5", timeout_s=1) == 0.0
    assert time.monotonic() - start < 30  # bounded: unbounded, this tower of powers never ends


# ---- countdown ----------------------------------------------------------------------------------

COUNTDOWN = PromptRecord(id="cd", prompt="Use 3, 4, 2 to make 24.", task="countdown", answer="24",
                         meta={"numbers": [3, 4, 2]})


def answer(expression: str) -> str:
    return f"<think>try things</think> <answer>{expression}</answer>"


@pytest.mark.parametrize("expression", ["3*4*2", " (3 * 4) * 2 ", "2*(4*3)", "3×4×2", "3 ⋅ 4 ⋅ 2",
                                        "3*(4*2)", "((4*2))*3"])
def test_countdown_valid(expression):
    assert countdown_reward(answer(expression), COUNTDOWN) == 1.0


def test_countdown_division_is_exact():
    record = PromptRecord(id="d", prompt="", task="countdown", answer="24", meta={"numbers": [8, 3, 8, 3]})
    # 8 / (3 - 8/3) = 24 only in exact arithmetic (floats give 23.99999999999999).
    assert countdown_reward(answer("8/(3-8/3)"), record) == 1.0
    assert countdown_reward(answer("8/(3−8÷3)"), record) == 1.0


@pytest.mark.parametrize("expression,reason", [
    ("3*4*2*1", "exactly once"),  # 1 is not given
    ("3*4+3*4", "exactly once"),  # 3 and 4 used twice, 2 not at all
    ("3*4", "exactly once"),  # 2 unused (TinyZero rule)
    ("3*4*2+0", "exactly once"),
    ("(3+4)*2", "wrong value"),
    ("3*4*2/(4-4)", "division by zero"),
    ("24", "exactly once"),
    ("-(-3*4*2)", "UnaryOp"),
    ("3**2*4*2", "invalid"),
    ("3.0*4*2", "Constant is not allowed"),
    ("3*4*2 = 24", "invalid"),
    ("", "no answer"),
])
def test_countdown_invalid(expression, reason):
    out = countdown_reward_detailed(answer(expression), COUNTDOWN)
    assert out.value == 0.0
    assert reason in out.info["reason"]


def test_countdown_division_by_zero():
    record = PromptRecord(id="z", prompt="", task="countdown", answer="1", meta={"numbers": [4, 4, 1]})
    out = countdown_reward_detailed(answer("1/(4-4)"), record)
    assert out.value == 0.0 and "division by zero" in out.info["reason"]


def test_countdown_at_most_once_rule():
    assert countdown_reward(answer("3*4*2"), COUNTDOWN, use_all=False) == 1.0
    record = PromptRecord(id="a", prompt="", task="countdown", answer="12", meta={"numbers": [3, 4, 2]})
    assert countdown_reward(answer("3*4"), record, use_all=False) == 1.0
    assert countdown_reward(answer("3*4"), record) == 0.0
    assert countdown_reward(answer("3*4*1"), record, use_all=False) == 0.0


@pytest.mark.parametrize("attack", [
    "__import__('os').system('touch /tmp/r1mega_pwned')",
    "open('/etc/passwd').read()",
    "(lambda: 24)()",
    "[x for x in (3, 4, 2)]",
    "3*4*2 if True else 0",
    "(3).__class__",
    "9" * 600,
    "(" * 300 + "1" + ")" * 300,
])
def test_countdown_injection_is_never_run(attack, tmp_path):
    assert countdown_reward(answer(attack), COUNTDOWN) == 0.0
    with pytest.raises(ValueError):
        evaluate_expression(attack)


def test_countdown_injection_has_no_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    attack = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert countdown_reward(answer(attack), COUNTDOWN) == 0.0
    assert not marker.exists()


def test_countdown_malformed_record():
    with pytest.raises(ValueError, match="numbers"):
        countdown_reward(answer("1"), PromptRecord(id="x", prompt="", task="countdown", answer="1"))
    with pytest.raises(ValueError, match="record.answer"):
        countdown_reward(answer("1"), PromptRecord(id="x", prompt="", task="countdown", answer="abc",
                                                   meta={"numbers": [1]}))


# ---- the "accuracy" registry entry ----------------------------------------------------------------


def test_accuracy_dispatch_math_and_countdown():
    accuracy = get_reward("accuracy")
    math = PromptRecord(id="m", prompt="1+1?", task="math", answer="2")
    out = accuracy(math, boxed("2"))
    assert out.value == 1.0 and out.info["task"] == "math" and out.info["answer"] == "2"
    assert accuracy(COUNTDOWN, answer("3*4*2")).value == 1.0
    with pytest.raises(GoldAnswerError):
        accuracy(PromptRecord(id="b", prompt="", task="math", answer="\\frac{"), boxed("1"))
    with pytest.raises(ValueError, match="general"):
        accuracy(PromptRecord(id="g", prompt="hi", task="general"), "hello")


def test_accuracy_dispatch_code(monkeypatch):
    # a stand-in for the sandboxed code reward checks the call it receives
    from r1mega.rewards import registry

    calls = []

    def code_reward(completion, tests, *, timeout_s, memory_mb):
        calls.append((completion, tests, timeout_s, memory_mb))
        return 0.5

    monkeypatch.setattr(registry, "code_reward", code_reward)
    tests = ({"input": "1\n", "output": "2\n"},)
    record = PromptRecord(id="c", prompt="add one", task="code", tests=tests)
    out = get_reward("accuracy")(record, "```python\nprint(int(input())+1)\n```",
                                 code_timeout_s=3.0, code_memory_mb=256)
    assert out.value == 0.5 and out.info == {"task": "code"}
    assert calls == [("```python\nprint(int(input())+1)\n```", tests, 3.0, 256)]
