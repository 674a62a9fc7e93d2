"""Prompt templates and the R1 completion format.

Three ways to turn a question into the text the policy continues:

* "r1_zero": the DeepSeek-R1-Zero template, verbatim from the paper (Table 1), for base models.
  The question replaces ``{prompt}`` as is; the paper's template puts a period after it even
  when the question ends in "?", and so does r1mega. The model's completion is expected to be
  ``<think> ... </think> <answer> ... </answer>`` (r1mega.rewards.format).
* "chat": the tokenizer's own chat template (``apply_chat_template`` with
  ``add_generation_prompt=True``), for instruct and distilled models. The rendered text already
  holds the template's special tokens (BOS, role markers): tokenize it with
  ``add_special_tokens=False``.
* "raw": the question alone.

The R1 cold-start output format is ``|special_token|<reasoning_process>|special_token|<summary>``
in the paper; r1mega renders it with the think tags DeepSeek-R1 itself emits,
``<think>\\n{reasoning}\\n</think>\\n\\n{summary}`` (:func:`render_r1_completion`). For math, the
summary ends with the final answer in ``\\boxed{}``, which the accuracy reward reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)

PROMPT_TEMPLATES = ("r1_zero", "chat", "raw")

# The chat template r1mega gives the embedded base model for the R1 stages (DeepSeek-R1's layout,
# with ASCII role markers: the embedded tokenizer has no special tokens for them). The base model
# has never seen it, as DeepSeek-V3-Base had not seen R1's: the cold-start SFT teaches it.
R1_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return value


def r1_zero_prompt(prompt: str) -> str:
    """The R1-Zero template around ``prompt``; ends with "Assistant:" (no trailing space)."""
    # str.replace, not str.format: questions contain braces (LaTeX, code).
    return R1_ZERO_TEMPLATE.replace("{prompt}", _check_str("prompt", prompt))


def chat_prompt(tokenizer: Any, prompt: str, *, system: str | None = None,
                **template_kwargs: Any) -> str:
    """``prompt`` as a user turn rendered by the tokenizer's chat template, ending with the
    assistant turn's opening (``add_generation_prompt=True``).

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        prompt: the user's question.
        system: an optional system message placed first.
        template_kwargs: extra variables for the template (e.g. ``enable_thinking=False``).

    Raises ValueError if the tokenizer has no chat template (a base model's tokenizer: use the
    "r1_zero" template instead).
    """
    _check_str("prompt", prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template; render prompts for a base model "
                         "with template 'r1_zero' (or set tokenizer.chat_template)")
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": _check_str("system", system)})
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)


def render_prompt(prompt: str, template: str, *, tokenizer: Any = None, system: str | None = None) -> str:
    """``prompt`` rendered with one of PROMPT_TEMPLATES ("chat" needs ``tokenizer``)."""
    if template == "r1_zero":
        return r1_zero_prompt(prompt)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer")
        return chat_prompt(tokenizer, prompt, system=system)
    if template == "raw":
        return _check_str("prompt", prompt)
    raise ValueError(f"template must be one of {PROMPT_TEMPLATES}, got {template!r}")


def render_prompts(records: Sequence[Any], tokenizer, template: str, max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each record's prompt under `template` (one of PROMPT_TEMPLATES); a record is
    anything with ``id`` and ``prompt`` (r1mega.data.PromptRecord, which builds on this module). A
    prompt longer than `max_prompt_tokens` raises naming the record."""
    out = []
    for r in records:
        if template == "r1_zero":
            ids = tokenizer(r1_zero_prompt(r.prompt), add_special_tokens=False)["input_ids"]
        elif template == "chat":
            ids = tokenizer(chat_prompt(tokenizer, r.prompt), add_special_tokens=False)["input_ids"]
        elif template == "raw":
            ids = tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"unknown template {template!r}")
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"prompt {r.id!r}: {len(ids)} tokens > rollout.max_prompt_tokens {max_prompt_tokens}")
        out.append(ids)
    return out


def boxed(answer: str) -> str:
    """``\\boxed{answer}``."""
    return "\\boxed{" + _check_str("answer", answer) + "}"


def render_r1_completion(reasoning: str, summary: str, *, answer: str | None = None) -> str:
    """An R1-format completion: ``<think>\\n{reasoning}\\n</think>\\n\\n{summary}``.

    ``answer`` (math): appended to the summary as ``\\n\\nThe final answer is $\\boxed{answer}$.``
    so the summary ends with the boxed answer the accuracy reward reads. Leading and trailing
    whitespace of ``reasoning`` and ``summary`` is dropped. Raises ValueError if either contains
    a think tag (the result would not parse back).
    """
    reasoning = _check_str("reasoning", reasoning).strip()
    summary = _check_str("summary", summary).strip()
    for name, text in (("reasoning", reasoning), ("summary", summary)):
        if THINK_OPEN in text or THINK_CLOSE in text:
            raise ValueError(f"{name} must not contain {THINK_OPEN} or {THINK_CLOSE}")
    if answer is not None:
        summary = f"{summary}\n\nThe final answer is ${boxed(answer)}$." if summary else \
            f"The final answer is ${boxed(answer)}$."
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{summary}"


def split_r1_completion(completion: str) -> tuple[str | None, str]:
    """``(reasoning, summary)`` of an R1-format completion; reasoning is None when there is no
    complete think block (then the whole text is the summary). Inverse of
    :func:`render_r1_completion` up to surrounding whitespace."""
    _check_str("completion", completion)
    start, end = completion.find(THINK_OPEN), completion.find(THINK_CLOSE)
    if start < 0 or end < start:
        return None, completion.strip()
    return completion[start + len(THINK_OPEN):end].strip(), completion[end + len(THINK_CLOSE):].strip()
