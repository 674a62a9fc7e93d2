"""Prompts against the token budget, checked when the data loads, before any model is built.

Every command that renders prompts (train, eval, sample, distill, the pipeline's stages) measures
each prompt as the policy will see it (its template applied, tokenized) against two limits:
``rollout.max_prompt_tokens``, and the model's positions less the completion budget. Real
datasets always hold a few long prompts; ``data.overlong_prompts`` says what happens to them:

* ``error``: one line naming the first offender, its length and the knobs to change;
* ``filter``: they are left out, and one line says how many, of which file, and why.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from r1mega.data.loader import DataError
from r1mega.templates import render_prompt


def prompt_lengths(records: Sequence[Any], tokenizer: Any, template: str) -> list[int]:
    """Tokens of each record's prompt under `template`, as r1mega.templates.render_prompts counts
    them (no special tokens added: the templates hold their own)."""
    texts = [render_prompt(r.prompt, template, tokenizer=tokenizer) for r in records]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def fit_prompts(records: Sequence[Any], tokenizer: Any, template: str, *, max_prompt_tokens: int, new_tokens: int,
                max_positions: int, overlong: str = "error", source: str = "run.data",
                new_tokens_key: str = "rollout.max_new_tokens", log: TextIO | None = None) -> list:
    """The records whose prompts fit: at most `max_prompt_tokens` tokens, and room for
    `new_tokens` more within the model's `max_positions`.

    overlong: "error" raises DataError (one line: `source`, the first offender's id, its length,
    the knobs); "filter" drops them and writes one line to `log` (stderr) saying how many. A
    budget that leaves no room for any prompt, and a filter that would leave nothing, raise too.
    """
    if overlong not in ("error", "filter"):
        raise ValueError(f"data.overlong_prompts: {overlong!r} is not 'error' or 'filter'")
    room = max_positions - new_tokens
    if room < 1:
        raise DataError(f"{source}: {new_tokens_key} {new_tokens} leaves no room for a prompt in the model's "
                        f"{max_positions} positions: lower {new_tokens_key}")
    limit = min(max_prompt_tokens, room)
    lengths = prompt_lengths(records, tokenizer, template)
    kept = [r for r, n in zip(records, lengths) if n <= limit]
    if len(kept) == len(records):
        return list(records)

    def why(n: int) -> str:
        if n > max_prompt_tokens:
            return f"{n} tokens > rollout.max_prompt_tokens {max_prompt_tokens}"
        return (f"{n} tokens + {new_tokens_key} {new_tokens} > the model's {max_positions} positions "
                f"(max_position_embeddings)")

    if overlong == "error" or not kept:
        first, n = next((r, n) for r, n in zip(records, lengths) if n > limit)
        if not kept:
            raise DataError(f"{source}: every prompt is too long (the first, {first.id!r}: {why(n)}); raise "
                            "rollout.max_prompt_tokens or use a model with more positions")
        knob = "raise rollout.max_prompt_tokens" if n > max_prompt_tokens else f"lower {new_tokens_key}"
        raise DataError(f"{source}: prompt {first.id!r}: {why(n)}; {knob}, or set data.overlong_prompts=filter to "
                        f"leave such prompts out ({len(records) - len(kept)} of {len(records)} are too long)")
    longest = max(lengths)
    (log or sys.stderr).write(f"{source}: left out {len(records) - len(kept)} of {len(records)} prompts longer than "
                              f"{limit} tokens (the longest: {longest}; data.overlong_prompts=filter)\n")
    return kept


__all__ = ["fit_prompts", "prompt_lengths"]
