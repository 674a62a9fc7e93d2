"""Language-consistency reward (DeepSeek-R1 stage 2): the share of the chain of thought's words
that are in the target language.

The paper defines it as "the proportion of target language words in the CoT" without giving the
word rule; r1mega's rule works on scripts, which is what language mixing looks like in practice
(an English CoT drifting into Chinese, or the reverse):

* The text scored is the chain of thought: the text before the last ``</think>`` when there is
  one (without the tags), else the text after ``<think>`` (a truncated completion), else the
  whole text.
* Math is neutral: ``$...$`` (within one line), ``$$...$$``, ``\\(...\\)`` and ``\\[...\\]``
  spans and LaTeX commands (``\\frac``) are removed first. Digits, punctuation, symbols and whitespace are
  neutral too.
* Words: each Han (CJK ideograph) character is one word; every other maximal run of letters of
  one script is one word (Latin, Cyrillic, Greek, kana, Hangul, ...). A one-letter non-Han word
  (``x``, ``α``, also English "a" and "I") is taken as a variable and is neutral.
* "en" counts Latin-script words (accented letters included, so this is a script test, not a
  language identifier: French passes as "en"); "zh" counts Han characters. Words of any other
  script count against both.
* The value is target words / all words, in [0, 1]; a text with no words (empty, or only math
  and numbers) scores 0.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from r1mega.data.records import LANGUAGES
from r1mega.rewards.base import RewardOutput, check_completion


# Inline $...$ stays on one line, so a stray dollar sign cannot swallow paragraphs of prose.
_MATH_SPANS = re.compile(r"\$\$.*?\$\$|(?<!\\)\$[^$\n]*?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_HAN = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef"
    "\U00030000-\U0003134f\U0002f800-\U0002fa1f]"
)
_LATIN = re.compile(
    "[A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\u2c60-\u2c7f"
    "\ua720-\ua7ff\uab30-\uab6f\uff21-\uff3a\uff41-\uff5a]"
)


def chain_of_thought(text: str, think: tuple[str, str] = ("<think>", "</think>")) -> str:
    """The reasoning part of ``text`` (rules in the module docstring)."""
    open_tag, close_tag = think
    end = text.rfind(close_tag)
    if end >= 0:
        body = text[:end]
    elif open_tag in text:
        body = text[text.index(open_tag) + len(open_tag):]
    else:
        body = text
    return body.replace(open_tag, " ").replace(close_tag, " ")


@functools.lru_cache(maxsize=65536)
def _script(ch: str) -> str:
    if _HAN.match(ch):
        return "han"
    if _LATIN.match(ch):
        return "latin"
    return "other"


def count_words(text: str) -> dict[str, int]:
    """Words of ``text`` by script: {"latin": n, "han": n, "other": n} (math, digits,
    punctuation and one-letter non-Han words left out; rules in the module docstring)."""
    text = unicodedata.normalize("NFC", text)
    text = _MATH_SPANS.sub(" ", text)
    text = _LATEX_COMMAND.sub(" ", text)
    counts = {"latin": 0, "han": 0, "other": 0}
    for run in _LETTER_RUN.findall(text):
        # Split the run where the script changes: "计算x的值" is 计, 算, x, 的, 值.
        start = 0
        for i in range(1, len(run) + 1):
            if i < len(run) and _script(run[i]) == _script(run[start]) and _script(run[i]) != "han":
                continue
            script = _script(run[start])
            if script == "han" or i - start > 1:
                counts[script] += 1
            start = i
    return counts


def language_consistency_detailed(text: str, lang: str) -> RewardOutput:
    """:func:`language_consistency` with the word counts in ``info``."""
    check_completion(text)
    if lang not in LANGUAGES:
        raise ValueError(f"lang must be one of {LANGUAGES}, got {lang!r}")
    counts = count_words(chain_of_thought(text))
    total = sum(counts.values())
    target = counts["latin" if lang == "en" else "han"]
    value = target / total if total else 0.0
    return RewardOutput(value, {"words": total, "target_words": target})


def language_consistency(text: str, lang: str) -> float:
    """Share of the chain of thought's words in ``lang`` ("en" or "zh"), in [0, 1].

    ``text`` is a completion or a bare chain of thought; with think tags, only the reasoning is
    scored. Empty text (no words) gives 0. Rules in the module docstring; raises ValueError for
    an unsupported ``lang``.
    """
    return language_consistency_detailed(text, lang).value
