"""Examples packed into rows: several per row, balanced by the C++ packer, with segment ids.

A row is examples back to back (each keeps its own tokens and loss mask), then right padding.
``segment_ids`` numbers a row's examples 1, 2, ... (0 on padding): the policy turns it into a
block-diagonal causal mask and per-example positions (r1mega.models.packing), so an example
is trained exactly as if it were alone in its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from r1mega.batching import pack_microbatches


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` and ``loss_mask`` (same length; True: the token is trained on, predicted
    from the one before, so the first is never trained on)."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) differ in length")
        if len(self.input_ids) < 2:
            raise ValueError("an example needs at least 2 tokens")


def pack_examples(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `row_tokens`
    (r1mega.batching.pack_microbatches: few rows, balanced; each row in index order)."""
    if not lengths:
        return []
    rows = pack_microbatches(list(lengths), row_tokens, 1)[0]
    return [sorted(r) for r in rows if r]


def collate(examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]], *, pad_id: int) -> dict:
    """[R, T] ``input_ids``, ``attention_mask``, ``loss_mask``, ``segment_ids`` of packed `rows`
    (T: the longest row)."""
    width = max(sum(len(examples[j].input_ids) for j in row) for row in rows)
    R = len(rows)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    loss = torch.zeros(R, width, dtype=torch.bool)
    seg = torch.zeros(R, width, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for s, j in enumerate(row, start=1):
            e = examples[j]
            n = len(e.input_ids)
            ids[r, t:t + n] = torch.tensor(e.input_ids)
            loss[r, t:t + n] = torch.tensor(e.loss_mask)
            loss[r, t] = False  # nothing before an example's first token predicts it
            seg[r, t:t + n] = s
            t += n
    return {"input_ids": ids, "attention_mask": seg > 0, "loss_mask": loss, "segment_ids": seg}
