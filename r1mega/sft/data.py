"""SFT data: JSONL (or JSON / Parquet) rows, validated before any work, tokenized for packing.

A row is either

* ``{"prompt": str, "completion": str}``: the prompt is rendered with the run's template
  (``run.template``: r1_zero, chat or raw, exactly as the GRPO trainer renders prompts for the
  rollout engine) and tokenized alone; the completion's tokens and the end-of-sequence token
  follow, and only they are trained on. The R1 output format is
  ``<think>\\n reasoning \\n</think>\\n\\n summary`` (r1mega.templates.render_r1_completion);
  rows written by ``r1mega sample`` are of this kind.
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: rendered
  by the tokenizer's chat template; every assistant turn is trained on (its tokens located by
  the character offsets of the rendered turns).

Other fields (``id``, ``task``, ``language``, ``provenance``, ...) are kept but not read. A bad
row stops the run with one line naming the file, the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from r1mega.data import DataError, RowError, read_checked_rows
from r1mega.sft.packing import TokenizedExample
from r1mega.templates import render_prompt
from r1mega.utils.io import atomic_write_text

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """One training example: ``prompt`` + ``completion``, or chat ``messages``."""

    id: str
    prompt: Optional[str] = None
    completion: Optional[str] = None
    messages: Optional[tuple[tuple[str, str], ...]] = None  # (role, content)


def _text(row: dict, name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field {name!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"field {name!r}: empty")
    return value


def _example(row: Any, index: int) -> SFTExample:
    if not isinstance(row, dict):
        raise RowError(f"expected an object, got {type(row).__name__}")
    ident = row.get("id", f"row-{index}")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise RowError(f"field 'id': expected a string or integer, got {type(ident).__name__}")
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            raise RowError("has both 'messages' and 'prompt'/'completion'; give one form")
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise RowError("field 'messages': expected a non-empty list of {role, content} objects")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise RowError(f"field 'messages[{i}]': expected an object with 'role' and 'content' only")
            if m["role"] not in ROLES:
                raise RowError(f"field 'messages[{i}].role': {m['role']!r} is not one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise RowError(f"field 'messages[{i}].content': expected a string")
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError(f"field 'messages[{i}].content': empty assistant turn")
            turns.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in turns):
            raise RowError("field 'messages': no assistant turn to train on")
        return SFTExample(str(ident), messages=tuple(turns))
    for name in ("prompt", "completion"):
        if name not in row:
            raise RowError(f"field {name!r}: missing (a row is prompt + completion, or messages)")
    return SFTExample(str(ident), prompt=_text(row, "prompt"), completion=_text(row, "completion"))


def load_sft_data(path: str | Path) -> list[SFTExample]:
    """Every row of `path`, validated; DataError (one line) on the first bad row."""
    return read_checked_rows(path, _example, lambda e: e.id)


def _chat_example(example: SFTExample, tokenizer) -> TokenizedExample:
    """Tokens of the rendered conversation; assistant turns (by character spans) are trained on."""
    messages = [{"role": r, "content": c} for r, c in example.messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError(f"example {example.id!r}: the chat template does not render turns as prefixes of the "
                             "conversation; give prompt + completion rows instead")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return TokenizedExample(list(ids), mask)


def tokenize_example(example: SFTExample, tokenizer, template: str) -> TokenizedExample:
    """The example's token ids and loss mask (completion / assistant tokens, and the EOS after a
    completion)."""
    if example.messages is not None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"example {example.id!r} is a chat conversation, but the tokenizer has no chat template")
        return _chat_example(example, tokenizer)
    prompt = tokenizer(render_prompt(example.prompt, template, tokenizer=tokenizer),
                       add_special_tokens=False)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    return TokenizedExample(list(prompt) + list(completion), [False] * len(prompt) + [True] * len(completion))


def tokenize_all(examples: Sequence[SFTExample], tokenizer, template: str, max_tokens: int,
                 source: str) -> list[TokenizedExample]:
    """tokenize_example of each; one longer than `max_tokens` raises (one line, naming it)."""
    out = []
    for e in examples:
        t = tokenize_example(e, tokenizer, template)
        if len(t.input_ids) > max_tokens:
            raise DataError(f"{source}: example {e.id!r}: {len(t.input_ids)} tokens > sft.row_tokens {max_tokens}; "
                            "raise sft.row_tokens or shorten it")
        if not any(t.loss_mask[1:]):
            raise DataError(f"{source}: example {e.id!r}: no completion tokens to train on")
        out.append(t)
    return out


def write_sft_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write SFT rows as JSONL, atomically."""
    import json

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(Path(path), text)
    return Path(path)
