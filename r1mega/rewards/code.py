"""Code-execution reward: the fraction of a record's tests that the completion's program passes.

The program is the last fenced code block of the completion labelled Python (```python,
```py, ```python3), or when there is none the last unlabelled one (``` ... ```); blocks in other
languages, and an unterminated block (a truncated completion), do not count. No block scores 0.

Tests (``PromptRecord.tests``) are dicts of one of two kinds:

* ``{"input": str, "output": str}``: the program reads ``input`` on stdin; it passes when it
  exits with status 0 and its stdout equals ``output`` after both are normalised: line endings
  to ``\\n``, trailing whitespace stripped from every line, trailing empty lines dropped.
* ``{"assert": str}``: Python run after the program in the same file (``program + "\\n" +
  assert``), e.g. ``assert f(2) == 4``, with empty stdin; it passes when the file exits with
  status 0 *and* reaches a line appended after the asserts that prints a random per-run token,
  so a program that exits early (``sys.exit(0)``, ``os._exit(0)``) does not pass.
  A program that reads its own source to find the token, or returns objects whose ``__eq__``
  always holds, still can: assert tests are only as strong as their asserts.

All tests of a completion run as the cases of one sandbox (:func:`r1mega.rewards.sandbox.run_cases`:
no network, a root file system of its own, seccomp, limits, each test with its own wall-clock
``timeout_s``, fresh scratch space and verdict; ``memory_mb`` per process and, with a cgroup,
for the whole sample). ``sandbox_per="test"`` gives each test a sandbox of its own instead (the
baseline of ``benchmarks/bench_rewards.py``; several times slower). A test that times out,
crashes or exceeds a limit fails.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from r1mega.rewards.sandbox import SandboxResult, run_cases

# The opening fence may follow other text on its line and the closing one may be followed by some,
# as in R1-Zero answers: "<answer>```python\n...\n```</answer>".
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
_PY_LABELS = {"python", "py", "python3", "py3"}
_STDERR_TAIL = 2000


def extract_program(completion: str) -> str | None:
    """The program in `completion`: its last ```python block, else its last unlabelled ```
    block (so an unlabelled block of sample output after the code is not taken), else None."""
    python, plain = None, None
    for m in _FENCE.finditer(completion):
        label = (m.group(1).split() or [""])[0].lower()
        if label in _PY_LABELS:
            python = m.group(2)
        elif not label:
            plain = m.group(2)
    return python if python is not None else plain


def normalize_output(text: str) -> str:
    """Output as compared: ``\\n`` line endings, no trailing whitespace per line or at the end."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def _check_tests(tests: Any) -> list[Mapping[str, str]]:
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence):
        raise ValueError(f"tests must be a list of dicts, got {type(tests).__name__}")
    if not tests:
        raise ValueError("tests is empty: a code reward needs at least one test")
    for i, t in enumerate(tests):
        if not isinstance(t, Mapping):
            raise ValueError(f"tests[{i}] must be a dict, got {type(t).__name__}")
        if "assert" in t:
            if not isinstance(t["assert"], str):
                raise ValueError(f"tests[{i}]['assert'] must be a str")
        elif "input" in t and "output" in t:
            if not isinstance(t["input"], str) or not isinstance(t["output"], str):
                raise ValueError(f"tests[{i}] input and output must be str")
        else:
            raise ValueError(f"tests[{i}] must have 'input' and 'output', or 'assert'; "
                             f"got keys {sorted(t)}")
    return list(tests)


def case_for_test(program: str, test: Mapping[str, str]) -> tuple[tuple[str, str], str | None]:
    """The sandbox case of one test, and the token an assert test must print (else None)."""
    if "assert" in test:
        token = secrets.token_hex(16)
        source = (f"{program}\n\n{test['assert']}\n\n"
                  f"__import__('sys').stdout.flush()\n"
                  f"__import__('os').write(1, b'\\n{token}\\n')\n")
        return (source, ""), token
    return (program, test["input"]), None


def passes_test(test: Mapping[str, str], token: str | None, r: SandboxResult) -> bool:
    """Whether sandbox result `r` of :func:`case_for_test`'s case passes `test` (`token`: its token)."""
    if token is not None:
        return r.ok and token in r.stdout
    return r.ok and normalize_output(r.stdout) == normalize_output(test["output"])


SANDBOX_PER = ("completion", "test")


def code_reward_details(completion: str, tests, *, timeout_s: float = 5.0, memory_mb: int = 512,
                        backend: str | None = None,
                        sandbox_per: str = "completion") -> tuple[float, dict[str, Any]]:
    """:func:`code_reward` with diagnostics: ``(fraction, info)``.

    sandbox_per: "completion" (all tests in one sandbox, the default) or "test".

    info: ``passed``, ``total``, ``error`` (e.g. "no code block", or None) and ``tests``, one
    entry per test: ``passed``, ``timed_out``, ``returncode``, ``seconds``, ``stderr_tail``
    (the last 2000 characters), and ``error`` when the sandbox itself failed.
    """
    tests = _check_tests(tests)
    if sandbox_per not in SANDBOX_PER:
        raise ValueError(f"sandbox_per must be one of {SANDBOX_PER}, got {sandbox_per!r}")
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    program = extract_program(completion)
    info: dict[str, Any] = {"passed": 0, "total": len(tests), "error": None, "tests": []}
    if program is None:
        info["error"] = "no code block"
        return 0.0, info
    cases, tokens = zip(*(case_for_test(program, t) for t in tests))
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "backend": backend}
    if sandbox_per == "completion":
        results = run_cases(list(cases), **limits)
    else:
        results = [run_cases([c], **limits)[0] for c in cases]
    passed = 0
    for test, token, r in zip(tests, tokens, results):
        ok = passes_test(test, token, r)
        passed += ok
        entry = {"passed": ok, "timed_out": r.timed_out, "returncode": r.returncode,
                 "seconds": round(r.seconds, 4), "stderr_tail": r.stderr[-_STDERR_TAIL:]}
        if r.error is not None:
            entry["error"] = r.error
        if r.output_truncated:
            entry["output_truncated"] = True
        info["tests"].append(entry)
    info["passed"] = passed
    return passed / len(tests), info


def code_reward(completion: str, tests, *, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """The fraction of `tests` the program in `completion` passes (0.0 without a code block).

    See the module docstring for extraction and comparison. Raises ValueError on malformed or
    empty `tests`, :class:`~r1mega.rewards.sandbox.SandboxUnavailable` when no sandbox backend
    works on this machine.
    """
    return code_reward_details(completion, tests, timeout_s=timeout_s, memory_mb=memory_mb)[0]
