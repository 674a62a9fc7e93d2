"""LaTeX answer boxes, read without math-verify (the data adapters take a solution's final
answer from its last box; the accuracy reward extracts a completion's the same way)."""

from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces nest; escaped braces (``\\{``, ``\\}``) are content, not groups. A box whose braces
    never close (a truncated completion) is skipped in favour of an earlier complete one.
    """
    for match in reversed(list(_BOX_START.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2  # \{, \}, \\ and commands: the next character is not a group brace
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end():i]
            i += 1
    return None


__all__ = ["last_boxed"]
