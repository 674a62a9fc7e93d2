"""The prompt record every dataset yields and every reward reads.

A record says which rewards apply through `task`: "math" (accuracy against `answer`), "code"
(tests in `tests`), "countdown" (arithmetic expression reaching a target, checked by rule), or
"general" (no rule: scored by a reward model). Datasets validate records on load; a record that
exists is well-formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("math", "code", "countdown", "general")
# The languages a chain of thought may be asked to be in: those the language-consistency reward
# can check. A row naming another language fails on load rather than in the reward mid-training.
LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and what is needed to score completions of it.

    id: unique within its dataset.
    prompt: the question as the user asks it (templates wrap it; see r1mega.templates).
    task: one of TASKS; selects the rule rewards.
    answer: the gold final answer (LaTeX or plain text) for "math" and "countdown" tasks.
    tests: for "code": a list of {"input": str, "output": str} (stdin -> expected stdout) or
        {"assert": str} (Python run after the program) test cases.
    language: the language the chain of thought should be in ("en", "zh"), for the
        language-consistency reward; None when not checked.
    meta: free-form extra fields kept from the source row (e.g. difficulty, source).
    """

    id: str
    prompt: str
    task: str
    answer: str | None = None
    tests: tuple[dict[str, str], ...] | None = None
    language: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
