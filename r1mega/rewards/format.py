"""Format reward: the completion has the shape its template asks for.

R1-Zero (``answer`` tags given, the default): exactly one think block followed by exactly one
answer block, ``<think> ... </think> <answer> ... </answer>``. Whitespace is allowed before,
between and after the blocks and nothing else: no text before ``<think>`` (the R1-Zero prompt
ends with "Assistant:", so a completion that follows the template starts with the tag; this is
TinyZero's / open-r1's ``^<think>.*?</think>\\s*<answer>.*?</answer>$``), none after
``</answer>``. Each tag must occur exactly once, so duplicated and nested tags score 0. Unlike
that regex, both blocks must hold some non-whitespace text: an empty answer block does not
"provide the user with the answer".

R1 cold-start format (``answer=None``): one think block, then a non-blank summary that contains
no think tag (r1mega.templates.render_r1_completion).

``think_prefilled=True`` is for prompts that already end with the opening think tag (e.g. the
DeepSeek-R1-Distill chat templates): the completion then starts inside the reasoning and must
not repeat the opening tag.

Completions must be decoded without special tokens: a trailing end-of-sequence string counts as
text after the last block.
"""

from __future__ import annotations

from r1mega.rewards.base import RewardOutput, check_completion

THINK_TAGS = ("<think>", "</think>")
ANSWER_TAGS = ("<answer>", "</answer>")


def _check_tags(name: str, tags: object) -> tuple[str, str]:
    if not (isinstance(tags, tuple) and len(tags) == 2 and all(isinstance(t, str) and t for t in tags)
            and tags[0] != tags[1]):
        raise ValueError(f"{name} must be a pair of distinct non-empty strings (open, close), got {tags!r}")
    return tags


def format_reward_detailed(
    completion: str,
    *,
    think: tuple[str, str] = THINK_TAGS,
    answer: tuple[str, str] | None = ANSWER_TAGS,
    think_prefilled: bool = False,
) -> RewardOutput:
    """:func:`format_reward` with ``info["reason"]`` saying what is wrong when it is 0."""
    check_completion(completion)
    think_open, think_close = _check_tags("think", think)
    tags = [think_open, think_close]
    if answer is not None:
        tags += list(_check_tags("answer", answer))
    if len(set(tags)) != len(tags):
        raise ValueError(f"think and answer tags must all differ, got {think!r} and {answer!r}")

    text = think_open + completion if think_prefilled else completion
    for tag in tags:
        count = text.count(tag)
        if count != 1:
            return _fail(f"{tag} occurs {count} times")
    if not text.lstrip().startswith(think_open):
        return _fail(f"text before {think_open}")
    start = text.index(think_open) + len(think_open)
    end = text.index(think_close)
    if end < start:
        return _fail(f"{think_close} before {think_open}")
    if not text[start:end].strip():
        return _fail("empty think block")
    rest = text[end + len(think_close):]
    if answer is None:
        if not rest.strip():
            return _fail("no summary after the think block")
        return RewardOutput(1.0)
    answer_open, answer_close = answer
    if not rest.lstrip().startswith(answer_open):
        return _fail(f"text between {think_close} and {answer_open}")
    a_start = rest.index(answer_open) + len(answer_open)
    a_end = rest.find(answer_close)
    if a_end < a_start:
        return _fail(f"{answer_close} before {answer_open}")
    if not rest[a_start:a_end].strip():
        return _fail("empty answer block")
    if rest[a_end + len(answer_close):].strip():
        return _fail(f"text after {answer_close}")
    return RewardOutput(1.0)


def _fail(reason: str) -> RewardOutput:
    return RewardOutput(0.0, {"reason": reason})


def format_reward(
    completion: str,
    *,
    think: tuple[str, str] = THINK_TAGS,
    answer: tuple[str, str] | None = ANSWER_TAGS,
    think_prefilled: bool = False,
) -> float:
    """1.0 if ``completion`` has exactly the template's block structure, else 0.0.

    Args:
        completion: the decoded completion (special tokens stripped).
        think: the (open, close) tags of the reasoning block.
        answer: the (open, close) tags of the answer block (R1-Zero), or None for the R1
            cold-start format: the think block followed by a free-text summary.
        think_prefilled: the prompt ends with ``think[0]``, so the completion starts inside the
            think block (and must not contain ``think[0]`` itself).

    The rules are in the module docstring. Raises ValueError for malformed tag arguments.
    """
    return format_reward_detailed(completion, think=think, answer=answer,
                                  think_prefilled=think_prefilled).value
