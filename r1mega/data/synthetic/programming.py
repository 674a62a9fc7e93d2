"""Small programming tasks with tests (task "code").

Sixteen families of problems, each parameterised (a divisor, a word, a base, a window, ...), in
three levels: difficulty d (1..3) draws from the families of level <= d, and larger d also gives
longer test inputs. A problem is a family and its parameters (the canonical key); its tests are a
function of the problem and the difficulty alone, so the same id always carries the same tests.

Tests follow PromptRecord.tests: ``{"input", "output"}`` pairs for programs that read standard
input (the output is compared after stripping trailing whitespace), or ``{"assert"}`` lines run
after a program that defines the requested function. Expected outputs are computed here by code
independent of the reference programs that `solution` writes; the test suite runs those programs
against the tests.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from functools import reduce

from r1mega.data.records import PromptRecord
from r1mega.data.synthetic.common import check_args, check_record, problem_id, render, sample_problems

NAME = "programming"
TASK = "code"
DIFFICULTIES = range(1, 4)

_WORDS = ("Fizz", "Buzz", "Bang", "Pop", "Zap", "Boom", "Whiz", "Ping")
_VOCAB = ("apple", "river", "stone", "cloud", "green", "light", "tiger", "piano", "orbit", "maple",
          "sun", "sky", "tree", "bird", "road", "lamp", "moon", "fire", "leaf", "wave")


def _word(rng: random.Random, low: int = 1, high: int = 7) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(low, high)))


def _int_line(nums: list[int]) -> str:
    return " ".join(map(str, nums)) + "\n"


class Family:
    """One family of problems. Subclasses define the parameters, prompt, tests and reference."""

    name: str
    level: int
    entry: str | None = None  # the function to write; None: a stdin -> stdout program

    def sample(self, rng: random.Random) -> dict: ...

    def prompt(self, p: dict) -> str: ...

    def cases(self, rng: random.Random, d: int, p: dict) -> list: ...

    def expected(self, p: dict, case) -> str | object: ...

    def source(self, p: dict) -> str: ...

    def explain(self, p: dict) -> str: ...

    def function_name(self, p: dict) -> str:
        return self.entry

    def tests(self, rng: random.Random, d: int, p: dict) -> tuple[dict[str, str], ...]:
        out = []
        for case in self.cases(rng, d, p):
            if self.entry is None:
                out.append({"input": case, "output": self.expected(p, case)})
            else:
                args = ", ".join(map(repr, case))
                out.append({"assert": f"assert {self.function_name(p)}({args}) == "
                                      f"{self.expected(p, case)!r}"})
        return tuple(out)


class SumMultiples(Family):
    name, level = "sum_multiples", 1

    def sample(self, rng):
        return {"k": rng.randint(2, 30)}

    def prompt(self, p):
        return (f"Write a Python program that reads one line of space-separated integers from "
                f"standard input and prints the sum of those that are divisible by {p['k']} "
                "(0 if there are none).")

    def cases(self, rng, d, p):
        k = p["k"]
        out = [_int_line([k + 1]), _int_line([k, -k, 3 * k])]
        for _ in range(2 + d):
            out.append(_int_line([rng.randint(-100 * d, 100 * d) for _ in range(rng.randint(1, 4 + 4 * d))]))
        return out

    def expected(self, p, case):
        return str(sum(x for x in map(int, case.split()) if x % p["k"] == 0))

    def source(self, p):
        return ("import sys\n\n"
                "nums = [int(tok) for tok in sys.stdin.read().split()]\n"
                f"print(sum(x for x in nums if x % {p['k']} == 0))\n")

    def explain(self, p):
        return (f"Read every integer, keep those with x % {p['k']} == 0 and add them up. Python's % "
                "returns 0 for negative multiples as well, and the sum of nothing is 0, so no special "
                "cases are needed.")


class Words(Family):
    name, level = "words", 1
    _MODE = {"order": "reverses the order of the words",
             "letters": "reverses the letters of every word while keeping the words in their order"}
    _CASE = {"upper": "in upper case", "lower": "in lower case", "keep": "with each letter's case unchanged"}

    def sample(self, rng):
        return {"mode": rng.choice(sorted(self._MODE)), "case": rng.choice(sorted(self._CASE))}

    def prompt(self, p):
        return (f"Write a Python program that reads one line of words separated by single spaces "
                f"from standard input, {self._MODE[p['mode']]}, and prints the words "
                f"{self._CASE[p['case']]}, separated by single spaces.")

    def cases(self, rng, d, p):
        out = [_word(rng) + "\n"]
        for _ in range(2 + d):
            out.append(" ".join(_word(rng) for _ in range(rng.randint(2, 2 + 3 * d))) + "\n")
        return out

    def expected(self, p, case):
        words = case.split()
        words = words[::-1] if p["mode"] == "order" else [w[::-1] for w in words]
        line = " ".join(words)
        return {"upper": line.upper(), "lower": line.lower(), "keep": line}[p["case"]]

    def source(self, p):
        turn = "words = words[::-1]" if p["mode"] == "order" else "words = [w[::-1] for w in words]"
        show = {"upper": "line.upper()", "lower": "line.lower()", "keep": "line"}[p["case"]]
        return f"words = input().split()\n{turn}\nline = \" \".join(words)\nprint({show})\n"

    def explain(self, p):
        how = ("reverse the list of words" if p["mode"] == "order"
               else "reverse each word on its own with slicing, keeping the list order")
        return (f"Split the line into words, {how}, join them with single spaces and print the "
                f"line {self._CASE[p['case']]}.")


class CountLetters(Family):
    name, level = "count_letters", 1

    def sample(self, rng):
        return {"letters": "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(2, 4))))}

    def prompt(self, p):
        return (f"Write a Python program that reads all of standard input and prints how many of its "
                f"characters are one of the letters {', '.join(p['letters'])}, in upper or lower case.")

    def cases(self, rng, d, p):
        alphabet = p["letters"] * 3 + p["letters"].upper() + string.ascii_letters + "  ,.!?"
        out = ["xyz 123\n" if not set(p["letters"]) & set("xyz") else "bcd 123\n"]
        for _ in range(2 + d):
            lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(5, 20 * d)))
                     for _ in range(rng.randint(1, d))]
            out.append("\n".join(lines) + "\n")
        return out

    def expected(self, p, case):
        return str(sum(ch in p["letters"] for ch in case.lower()))

    def source(self, p):
        return ("import sys\n\n"
                "text = sys.stdin.read()\n"
                f"print(sum(1 for ch in text.lower() if ch in \"{p['letters']}\"))\n")

    def explain(self, p):
        return ("Read the whole input at once (it may span several lines), lower-case it so both "
                f"cases count, and count the characters that are in \"{p['letters']}\".")


class Poly(Family):
    name, level, entry = "poly", 1, "poly"

    def sample(self, rng):
        return {"a": rng.choice([x for x in range(-9, 10) if x]), "b": rng.randint(-9, 9),
                "c": rng.randint(-9, 9)}

    @staticmethod
    def _terms(p, x2: str, x1: str, times: str) -> str:
        text = ""
        for coef, power in ((p["a"], x2), (p["b"], x1), (p["c"], "")):
            if coef == 0:
                continue
            mag = abs(coef)
            term = power if mag == 1 and power else f"{mag}{times}{power}" if power else str(mag)
            sign = ("-" if coef < 0 else "") if not text else (" - " if coef < 0 else " + ")
            text += sign + term
        return text

    def prompt(self, p):
        return (f"Write a Python function `poly(x)` that returns the value of the polynomial "
                f"{self._terms(p, 'x^2', 'x', '')} at the integer x.")

    def cases(self, rng, d, p):
        return [(0,), (1,), (-1,)] + [(rng.randint(-10 * d, 10 * d),) for _ in range(1 + d)]

    def expected(self, p, case):
        (x,) = case
        return p["a"] * x * x + p["b"] * x + p["c"]

    def source(self, p):
        return f"def poly(x):\n    return {self._terms(p, 'x * x', 'x', ' * ')}\n"

    def explain(self, p):
        return ("Evaluate the polynomial directly with integer arithmetic; x * x is exact for "
                "integers of any size, so there is nothing to round.")


class FizzBuzz(Family):
    name, level = "fizzbuzz", 1

    def sample(self, rng):
        a, b = sorted(rng.sample(range(2, 10), 2))
        w1, w2 = rng.sample(_WORDS, 2)
        return {"a": a, "b": b, "w1": w1, "w2": w2}

    def prompt(self, p):
        a, b, w1, w2 = p["a"], p["b"], p["w1"], p["w2"]
        return (f"Write a Python program that reads an integer n (1 <= n <= 1000) from standard input "
                f"and, for each i from 1 to n, prints one line: \"{w1}{w2}\" if i is divisible by both "
                f"{a} and {b}, \"{w1}\" if it is divisible by {a} only, \"{w2}\" if it is divisible "
                f"by {b} only, and the number i itself otherwise.")

    def cases(self, rng, d, p):
        return ["1\n", f"{p['a'] * p['b']}\n"] + [f"{rng.randint(2, 15 * d)}\n" for _ in range(1 + d)]

    def expected(self, p, case):
        lines = []
        for i in range(1, int(case) + 1):
            word = (p["w1"] if i % p["a"] == 0 else "") + (p["w2"] if i % p["b"] == 0 else "")
            lines.append(word or str(i))
        return "\n".join(lines)

    def source(self, p):
        a, b, w1, w2 = p["a"], p["b"], p["w1"], p["w2"]
        return ("n = int(input())\n"
                "for i in range(1, n + 1):\n"
                f"    if i % {a} == 0 and i % {b} == 0:\n"
                f"        print(\"{w1}{w2}\")\n"
                f"    elif i % {a} == 0:\n"
                f"        print(\"{w1}\")\n"
                f"    elif i % {b} == 0:\n"
                f"        print(\"{w2}\")\n"
                "    else:\n"
                "        print(i)\n")

    def explain(self, p):
        return (f"Loop i from 1 to n and test the combined case first: a number divisible by both "
                f"{p['a']} and {p['b']} must print \"{p['w1']}{p['w2']}\", so that branch has to come "
                "before the single-divisor branches.")


class Caesar(Family):
    name, level = "caesar", 1

    def sample(self, rng):
        return {"k": rng.randint(1, 25), "direction": rng.choice(["forward", "backward"])}

    def prompt(self, p):
        return (f"Write a Python program that reads one line of text from standard input, shifts every "
                f"letter {p['k']} places {p['direction']} in the alphabet (wrapping around between z "
                "and a, and keeping upper-case letters upper case and lower-case letters lower case), "
                "leaves every other character unchanged, and prints the result.")

    def cases(self, rng, d, p):
        out = ["Zz Aa, xyz!\n"]
        for _ in range(2 + d):
            out.append(" ".join(_word(rng) + rng.choice(["", ",", "!", "?", "1"])
                                for _ in range(rng.randint(1, 2 + 2 * d))) + "\n")
        return out

    def _shift(self, p):
        return p["k"] if p["direction"] == "forward" else -p["k"]

    def expected(self, p, case):
        s = self._shift(p)
        out = []
        for ch in case.rstrip("\n"):
            if ch in string.ascii_lowercase:
                out.append(string.ascii_lowercase[(string.ascii_lowercase.index(ch) + s) % 26])
            elif ch in string.ascii_uppercase:
                out.append(string.ascii_uppercase[(string.ascii_uppercase.index(ch) + s) % 26])
            else:
                out.append(ch)
        return "".join(out)

    def source(self, p):
        s = self._shift(p)
        return ("text = input()\n"
                "out = []\n"
                "for ch in text:\n"
                "    if \"a\" <= ch <= \"z\":\n"
                f"        out.append(chr((ord(ch) - ord(\"a\") + {s}) % 26 + ord(\"a\")))\n"
                "    elif \"A\" <= ch <= \"Z\":\n"
                f"        out.append(chr((ord(ch) - ord(\"A\") + {s}) % 26 + ord(\"A\")))\n"
                "    else:\n"
                "        out.append(ch)\n"
                "print(\"\".join(out))\n")

    def explain(self, p):
        return (f"Map each letter to its position 0-25, add {self._shift(p)} and take the result "
                "modulo 26 (Python's % is never negative, so shifting backward wraps correctly too), "
                "then map back within the same case. Anything that is not a letter is copied.")


class FibMod(Family):
    name, level = "fib_mod", 2

    def sample(self, rng):
        m = rng.randint(2, 1000) if rng.random() < 0.5 else rng.randint(1000, 10 ** 9 + 7)
        return {"x": rng.randint(0, 9), "y": rng.randint(0, 9), "m": m}

    def prompt(self, p):
        return (f"A sequence starts with a_0 = {p['x']} and a_1 = {p['y']}, and every later term is the "
                "sum of the two terms before it. Write a Python program that reads an integer n "
                f"(0 <= n <= 100000) from standard input and prints a_n modulo {p['m']}.")

    def cases(self, rng, d, p):
        return ["0\n", "1\n", "2\n"] + [f"{rng.randint(3, 10 ** (d + 1))}\n" for _ in range(1 + d)]

    def expected(self, p, case):
        a, b = p["x"], p["y"]
        for _ in range(int(case)):
            a, b = b, a + b
            a, b = a % p["m"], b % p["m"]
        return str(a % p["m"])

    def source(self, p):
        m = p["m"]
        return ("n = int(input())\n"
                f"a, b = {p['x']} % {m}, {p['y']} % {m}\n"
                "for _ in range(n):\n"
                f"    a, b = b, (a + b) % {m}\n"
                "print(a)\n")

    def explain(self, p):
        return (f"Iterate the recurrence n times keeping only the last two terms, reducing modulo "
                f"{p['m']} at every step so the numbers stay small; (a + b) mod m only depends on a "
                "mod m and b mod m. After n steps the first of the pair is a_n, and n = 0 prints "
                "a_0 mod m.")


class GcdLcm(Family):
    name, level, entry = "gcd_lcm", 2, "gcd_all"  # or lcm_all: see function_name

    def sample(self, rng):
        return {"op": rng.choice(["gcd", "lcm"])}

    def function_name(self, p):
        return f"{p['op']}_all"

    def prompt(self, p):
        what = "greatest common divisor" if p["op"] == "gcd" else "least common multiple"
        return (f"Write a Python function `{p['op']}_all(nums)` that returns the {what} of a "
                "non-empty list of positive integers.")

    def cases(self, rng, d, p):
        out = [([7],), ([4, 6],)]
        for _ in range(2 + d):
            g = rng.randint(1, 12)
            out.append(([g * rng.randint(1, 10 * d) for _ in range(rng.randint(2, 2 + d))],))
        return out

    def expected(self, p, case):
        (nums,) = case
        if p["op"] == "gcd":
            return reduce(math.gcd, nums)
        return reduce(lambda a, b: a * b // math.gcd(a, b), nums)

    def source(self, p):
        if p["op"] == "gcd":
            return ("from math import gcd\n\n\n"
                    "def gcd_all(nums):\n"
                    "    result = 0\n"
                    "    for x in nums:\n"
                    "        result = gcd(result, x)\n"
                    "    return result\n")
        return ("from math import gcd\n\n\n"
                "def lcm_all(nums):\n"
                "    result = 1\n"
                "    for x in nums:\n"
                "        result = result * x // gcd(result, x)\n"
                "    return result\n")

    def explain(self, p):
        if p["op"] == "gcd":
            return ("Fold the list with math.gcd starting from 0, since gcd(0, x) = x; the gcd of "
                    "the whole list is the gcd of the running result with each next number.")
        return ("Fold the list starting from 1 with lcm(a, b) = a * b // gcd(a, b); Python integers "
                "do not overflow, so the product is safe.")


class SortUnique(Family):
    name, level = "sort_unique", 2
    _SEP = {" ": "single spaces", ", ": "a comma and a space"}

    def sample(self, rng):
        return {"t": rng.randint(-20, 20), "order": rng.choice(["ascending", "descending"]),
                "sep": rng.choice(sorted(self._SEP))}

    def prompt(self, p):
        return (f"Write a Python program that reads space-separated integers from standard input and "
                f"prints the distinct values that are at least {p['t']}, in {p['order']} order, "
                f"separated by {self._SEP[p['sep']]}; if there are none, it prints NONE.")

    def cases(self, rng, d, p):
        t = p["t"]
        out = [_int_line([t - 1, t - 5, t - 1]), _int_line([t, t, t + 1])]
        for _ in range(2 + d):
            count = rng.randint(1, 5 * d + 3)
            out.append(_int_line([rng.randint(t - 10 * d, t + 10 * d) for _ in range(count)]))
        return out

    def expected(self, p, case):
        values = sorted({x for x in map(int, case.split()) if x >= p["t"]},
                        reverse=p["order"] == "descending")
        return p["sep"].join(map(str, values)) if values else "NONE"

    def source(self, p):
        return ("import sys\n\n"
                "nums = [int(tok) for tok in sys.stdin.read().split()]\n"
                f"values = sorted({{x for x in nums if x >= {p['t']}}}, "
                f"reverse={p['order'] == 'descending'})\n"
                f"print(\"{p['sep']}\".join(map(str, values)) if values else \"NONE\")\n")

    def explain(self, p):
        return (f"A set comprehension filters the values >= {p['t']} and drops duplicates at once; "
                f"sort it {p['order']}, join with \"{p['sep']}\", and handle the empty case with NONE.")


class Running(Family):
    name, level = "running_window", 2
    _WHAT = {"max": "largest", "min": "smallest", "sum": "sum"}

    def sample(self, rng):
        return {"kind": rng.choice(sorted(self._WHAT)), "w": rng.randint(2, 9)}

    def prompt(self, p):
        what = self._WHAT[p["kind"]]
        noun = f"the {what}" if p["kind"] != "sum" else "the sum"
        return (f"Write a Python program that reads space-separated integers from standard input and "
                f"prints, separated by single spaces, one number per input number: the i-th printed "
                f"number is {noun} of the last {p['w']} input numbers up to and including the i-th "
                f"(of all of them while fewer than {p['w']} have been read).")

    def cases(self, rng, d, p):
        out = [_int_line([5])]
        for _ in range(2 + d):
            out.append(_int_line([rng.randint(-50, 50) for _ in range(rng.randint(1, p["w"] + 4 * d))]))
        return out

    def expected(self, p, case):
        nums = list(map(int, case.split()))
        fn = {"max": max, "min": min, "sum": sum}[p["kind"]]
        return " ".join(str(fn(nums[max(0, i - p["w"] + 1):i + 1])) for i in range(len(nums)))

    def source(self, p):
        return ("import sys\n\n"
                "nums = [int(tok) for tok in sys.stdin.read().split()]\n"
                "out = []\n"
                "for i in range(len(nums)):\n"
                f"    window = nums[max(0, i - {p['w'] - 1}):i + 1]\n"
                f"    out.append({p['kind']}(window))\n"
                "print(\" \".join(map(str, out)))\n")

    def explain(self, p):
        return (f"For position i the window is nums[max(0, i - {p['w'] - 1}) : i + 1], which holds "
                f"the last {p['w']} numbers, or all of them near the start. Apply {p['kind']} to each "
                "window; the windows are short, so recomputing them is fast enough.")


class Palindrome(Family):
    name, level, entry = "palindrome", 2, "is_pal"

    def sample(self, rng):
        return {"mode": rng.choice(["loose", "strict"])}

    def prompt(self, p):
        if p["mode"] == "strict":
            rule = "reads the same forwards and backwards, character for character"
        else:
            rule = ("reads the same forwards and backwards once every character that is not a letter "
                    "or a digit is dropped and case is ignored")
        return (f"Write a Python function `is_pal(s)` that returns True if the string s {rule}, "
                "and False otherwise.")

    def cases(self, rng, d, p):
        out = [("",)]
        for k in range(3 + d):
            half = "".join(rng.choice("abcde12") for _ in range(rng.randint(1, 3 * d)))
            s = half + rng.choice(["", "x"]) + half[::-1]
            if k % 2:  # break it
                s = s + rng.choice("fg")
            if p["mode"] == "loose":
                s = "".join(ch.upper() if rng.random() < 0.3 else ch for ch in s)
                s = "".join(ch + (rng.choice(" ,.!") if rng.random() < 0.3 else "") for ch in s)
            out.append((s,))
        return out

    def expected(self, p, case):
        (s,) = case
        if p["mode"] == "strict":
            return s == s[::-1]
        kept = [ch.lower() for ch in s if ch in string.ascii_letters + string.digits]
        return kept == kept[::-1]

    def source(self, p):
        if p["mode"] == "strict":
            return "def is_pal(s):\n    return s == s[::-1]\n"
        return ("def is_pal(s):\n"
                "    kept = [ch.lower() for ch in s if ch.isalnum()]\n"
                "    return kept == kept[::-1]\n")

    def explain(self, p):
        if p["mode"] == "strict":
            return "Compare the string with its reverse s[::-1]; the empty string is a palindrome."
        return ("Keep only letters and digits (str.isalnum), lower-case them, and compare the list "
                "with its reverse; punctuation and spaces are ignored, and an empty result counts "
                "as a palindrome.")


class DigitSum(Family):
    name, level, entry = "digit_sum", 2, "digit_sum"

    def sample(self, rng):
        return {"base": rng.randint(2, 16)}

    def prompt(self, p):
        return (f"Write a Python function `digit_sum(n)` that returns the sum of the digits of the "
                f"non-negative integer n written in base {p['base']} (each digit counted by its value, "
                f"from 0 to {p['base'] - 1}).")

    def cases(self, rng, d, p):
        randoms = [(rng.randint(1, 10 ** (2 + d)),) for _ in range(1 + d)]
        return [(0,), (p["base"] - 1,), (p["base"],)] + randoms

    def expected(self, p, case):
        (n,) = case
        total = 0
        while n:
            n, r = divmod(n, p["base"])
            total += r
        return total

    def source(self, p):
        b = p["base"]
        return ("def digit_sum(n):\n"
                "    total = 0\n"
                "    while n > 0:\n"
                f"        total += n % {b}\n"
                f"        n //= {b}\n"
                "    return total\n")

    def explain(self, p):
        return (f"The last base-{p['base']} digit of n is n % {p['base']}; add it and drop it with "
                f"n //= {p['base']} until n is 0. For n = 0 the loop never runs and the sum is 0.")


class Matrix(Family):
    name, level = "matrix", 3
    _HOW = {"transpose": "transposed", "cw": "rotated 90 degrees clockwise",
            "ccw": "rotated 90 degrees counterclockwise"}

    def sample(self, rng):
        return {"mode": rng.choice(sorted(self._HOW))}

    def prompt(self, p):
        return ("Write a Python program that reads a matrix from standard input: a first line with two "
                "integers r and c, then r lines of c integers each. It prints the matrix "
                f"{self._HOW[p['mode']]}, one row per line, with the numbers separated by single spaces.")

    def cases(self, rng, d, p):
        out = []
        for r, c in [(1, 1), (1, 3)] + [(rng.randint(1, 2 + d), rng.randint(1, 2 + d)) for _ in range(2 + d)]:
            rows = [[rng.randint(-9, 99) for _ in range(c)] for _ in range(r)]
            out.append(f"{r} {c}\n" + "".join(_int_line(row) for row in rows))
        return out

    def expected(self, p, case):
        lines = case.splitlines()
        r, c = map(int, lines[0].split())
        m = [lines[1 + i].split() for i in range(r)]
        if p["mode"] == "transpose":
            out = [[m[i][j] for i in range(r)] for j in range(c)]
        elif p["mode"] == "cw":
            out = [[m[r - 1 - i][j] for i in range(r)] for j in range(c)]
        else:
            out = [[m[i][c - 1 - j] for i in range(r)] for j in range(c)]
        return "\n".join(" ".join(row) for row in out)

    def source(self, p):
        make = {"transpose": "[list(col) for col in zip(*m)]",
                "cw": "[list(col) for col in zip(*m[::-1])]",
                "ccw": "[list(col) for col in zip(*m)][::-1]"}[p["mode"]]
        return ("import sys\n\n"
                "data = sys.stdin.read().split()\n"
                "r, c = int(data[0]), int(data[1])\n"
                "vals = data[2:]\n"
                "m = [vals[i * c:(i + 1) * c] for i in range(r)]\n"
                f"out = {make}\n"
                "for row in out:\n"
                "    print(\" \".join(row))\n")

    def explain(self, p):
        how = {"transpose": "zip(*m) yields the columns, which are the rows of the transpose",
               "cw": "reversing the rows and then taking columns with zip(*...) rotates clockwise",
               "ccw": "taking the columns with zip(*m) and reversing their order rotates "
                      "counterclockwise"}[p["mode"]]
        return (f"Read all tokens, split them into r rows of c, and note that {how}. The numbers can "
                "stay as strings since they are printed unchanged; the result has c rows of r numbers.")


class TopWords(Family):
    name, level = "top_words", 3

    def sample(self, rng):
        return {"k": rng.randint(1, 5)}

    def prompt(self, p):
        return ("Write a Python program that reads all of standard input, where words are maximal runs "
                "of the letters a-z compared without regard to case, and prints the "
                f"{p['k']} most frequent words (fewer if there are fewer distinct words), one per line "
                "as the word in lower case, a space and its count, ordered by count from high to low "
                "and alphabetically among equal counts.")

    def cases(self, rng, d, p):
        out = ["Hello hello HELLO\n"]
        for _ in range(3 + d):
            vocab = rng.sample(_VOCAB, rng.randint(2, 3 + 2 * d))
            lines = []
            for _ in range(rng.randint(1, d + 1)):
                words = [rng.choice(vocab) for _ in range(rng.randint(1, 6 * d))]
                words = [w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.2 else w
                         for w in words]
                lines.append(" ".join(w + rng.choice(["", "", ",", ".", "!", "'s", "-1"]) for w in words))
            out.append("\n".join(lines) + "\n")
        return out

    def expected(self, p, case):
        counts = Counter(re.findall(r"[a-z]+", case.lower()))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:p["k"]]
        return "\n".join(f"{w} {c}" for w, c in ranked)

    def source(self, p):
        return ("import re\n"
                "import sys\n"
                "from collections import Counter\n\n"
                "words = re.findall(r\"[a-z]+\", sys.stdin.read().lower())\n"
                "counts = Counter(words)\n"
                "ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))\n"
                f"for word, count in ranked[:{p['k']}]:\n"
                "    print(word, count)\n")

    def explain(self, p):
        return ("Lower-case the text and extract words with the regular expression [a-z]+, so "
                "punctuation, digits and apostrophes split words. Count them with Counter and sort "
                f"by (-count, word) so that ties are alphabetical, then print the first {p['k']}.")


class Brackets(Family):
    name, level, entry = "brackets", 3, "balanced"
    _KINDS = ("()", "[]", "{}", "<>")

    def sample(self, rng):
        kinds = sorted(rng.sample(self._KINDS, rng.randint(2, 4)), key=self._KINDS.index)
        return {"kinds": "".join(kinds)}

    def _pairs(self, p):
        k = p["kinds"]
        return {k[i + 1]: k[i] for i in range(0, len(k), 2)}

    def prompt(self, p):
        shown = " ".join(p["kinds"][i:i + 2] for i in range(0, len(p["kinds"]), 2))
        return (f"Write a Python function `balanced(s)` that returns True if the brackets {shown} in "
                "the string s are balanced (every opening bracket is closed by a bracket of the same "
                "kind, properly nested) and False otherwise. All other characters are ignored, "
                "including brackets of other kinds.")

    def _balanced_string(self, rng, depth: int, p) -> str:
        kinds = [p["kinds"][i:i + 2] for i in range(0, len(p["kinds"]), 2)]
        parts = []
        for _ in range(rng.randint(1, 3)):
            if depth > 0 and rng.random() < 0.7:
                pair = rng.choice(kinds)
                parts.append(pair[0] + self._balanced_string(rng, depth - 1, p) + pair[1])
            else:
                # Filler, including brackets of kinds the problem ignores.
                noise = ["a", "x1", " "] + [ch for ch in "(<" if ch not in p["kinds"]]
                parts.append(rng.choice(noise))
        return "".join(parts)

    def cases(self, rng, d, p):
        out = [("",)]
        for k in range(3 + d):
            s = self._balanced_string(rng, d + 1, p)
            brackets = [i for i, ch in enumerate(s) if ch in p["kinds"]]
            if k % 2 and brackets:  # break it: drop one bracket, or swap two adjacent bracket chars
                i = rng.choice(brackets)
                s = s[:i] + s[i + 1:] if rng.random() < 0.5 else s[:i] + s[i + 1:] + s[i]
            out.append((s,))
        out.append((p["kinds"][1] + p["kinds"][0],))  # closed before opened
        return out

    def expected(self, p, case):
        (s,) = case
        pairs = self._pairs(p)
        stack = []
        for ch in s:
            if ch in pairs.values():
                stack.append(ch)
            elif ch in pairs:
                if not stack or stack[-1] != pairs[ch]:
                    return False
                stack.pop()
        return not stack

    def source(self, p):
        return ("def balanced(s):\n"
                f"    pairs = {self._pairs(p)!r}\n"
                "    opening = set(pairs.values())\n"
                "    stack = []\n"
                "    for ch in s:\n"
                "        if ch in opening:\n"
                "            stack.append(ch)\n"
                "        elif ch in pairs:\n"
                "            if not stack or stack.pop() != pairs[ch]:\n"
                "                return False\n"
                "    return not stack\n")

    def explain(self, p):
        return ("Use a stack: push every opening bracket; on a closing bracket the top of the stack "
                "must be its partner, else the string is unbalanced. At the end the stack must be "
                "empty. Characters that are not brackets of the listed kinds are skipped.")


class PrimesMod(Family):
    name, level = "primes_mod", 3

    def sample(self, rng):
        m = rng.randint(2, 12)
        return {"m": m, "r": rng.randrange(m)}

    def prompt(self, p):
        return ("Write a Python program that reads two integers lo and hi (1 <= lo <= hi <= 100000) "
                "from standard input and prints how many primes p with lo <= p <= hi leave the "
                f"remainder {p['r']} when divided by {p['m']}.")

    def cases(self, rng, d, p):
        out = ["1 1\n", f"{p['m']} {p['m'] + 1}\n"]
        for _ in range(2 + d):
            hi = rng.randint(2, 2000 * d)
            out.append(f"{rng.randint(1, hi)} {hi}\n")
        return out

    def expected(self, p, case):
        lo, hi = map(int, case.split())
        return str(sum(1 for q in range(lo, hi + 1) if _is_prime(q) and q % p["m"] == p["r"]))

    def source(self, p):
        return ("import math\n\n"
                "lo, hi = map(int, input().split())\n"
                "sieve = bytearray([1]) * (hi + 1)\n"
                "sieve[0] = 0\n"
                "sieve[1] = 0\n"
                "for i in range(2, math.isqrt(hi) + 1):\n"
                "    if sieve[i]:\n"
                "        sieve[i * i::i] = bytearray(len(range(i * i, hi + 1, i)))\n"
                f"print(sum(1 for q in range(lo, hi + 1) if sieve[q] and q % {p['m']} == {p['r']}))\n")

    def explain(self, p):
        return ("Sieve of Eratosthenes up to hi: cross out multiples of every prime up to sqrt(hi), "
                f"starting from its square. Then count the primes in [lo, hi] with p % {p['m']} == "
                f"{p['r']}; hi is at most 100000, so the sieve is small.")


_PRIMES_CACHE: dict[int, bool] = {}


def _is_prime(q: int) -> bool:
    if q not in _PRIMES_CACHE:
        _PRIMES_CACHE[q] = q >= 2 and all(q % f for f in range(2, math.isqrt(q) + 1))
    return _PRIMES_CACHE[q]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    SumMultiples(), Words(), CountLetters(), Poly(), FizzBuzz(), Caesar(),
    FibMod(), GcdLcm(), SortUnique(), Running(), Palindrome(), DigitSum(),
    Matrix(), TopWords(), Brackets(), PrimesMod())}


def _draw(difficulty: int):
    families = [f for f in FAMILIES.values() if f.level <= difficulty]

    def draw(rng: random.Random):
        family = rng.choice(families)
        params = family.sample(rng)
        return f"{NAME}:{family.name}:{json.dumps(params, sort_keys=True)}", (family, params)
    return draw


def generate(n: int, *, seed: int, difficulty: int, split: str = "train") -> list[PromptRecord]:
    """n distinct programming problems of `split` from the families of level <= difficulty."""
    check_args(NAME, n, seed, difficulty, split, DIFFICULTIES)
    records = []
    for key, (family, params) in sample_problems(NAME, n, seed, difficulty, split, _draw(difficulty)):
        tests = family.tests(random.Random(f"{key}|tests|d{difficulty}"), difficulty, params)
        meta = {"generator": f"r1mega.data.synthetic.{NAME}", "difficulty": difficulty,
                "split": split, "family": family.name, "params": params}
        if family.entry:
            meta["entry_point"] = family.function_name(params)
        records.append(PromptRecord(
            id=problem_id(NAME, difficulty, key),
            prompt=family.prompt(params),
            task=TASK,
            tests=tests,
            language="en",
            meta=meta,
        ))
    return records


def reference_program(record: PromptRecord) -> str:
    """The reference solution's source for a programming record."""
    meta = check_record(record, TASK, NAME, "family", "params")
    if meta["family"] not in FAMILIES:
        raise ValueError(f"{NAME}: record {record.id!r}: unknown family {meta['family']!r}")
    return FAMILIES[meta["family"]].source(meta["params"])


def solution(record: PromptRecord, style: str = "r1") -> str:
    """A completion with the reference program in a fenced python block, R1 or R1-Zero format."""
    code = reference_program(record)
    family = FAMILIES[record.meta["family"]]
    params = record.meta["params"]
    first = record.tests[0] if record.tests else None
    lines = [f"The task: {family.prompt(params)}", family.explain(params)]
    if first is not None and "assert" in first:
        lines.append(f"This must satisfy, for example: {first['assert']}")
    elif first is not None:
        lines.append(f"For example, the input {first['input']!r} must give the output {first['output']!r}.")
    what = (f"the function `{family.function_name(params)}`" if family.entry
            else "a program that reads standard input")
    block = f"```python\n{code}```"
    summary = f"{family.explain(params)}\n\nHere is {what}:\n\n{block}"
    return render(style, "\n\n".join(lines), summary, block)
