"""Packed rows for the megatron policy: several examples per row, none seeing another.

A packed row holds examples back to back, then right padding; ``segment_ids`` [B, T] numbers
them 1, 2, ... within the row (0: padding). Two things must not cross an example boundary:

* attention: :func:`block_causal_mask` is megatron's boolean mask [B, 1, T, T] (True: masked
  out) allowing token t to see token u only when u <= t and both are in the same example. The
  local (TE-less) attention applies a given mask as it is; Transformer Engine's fused attention
  would ignore it under the causal mask type, so packed rows are refused there (it needs
  ``PackedSeqParams`` in THD layout instead).
* positions: :func:`segment_positions` restarts at 0 in every example, and
  :class:`PackedRope` makes every rotary embedding of the model (GPTModel's, and each MLA
  layer's own) return its table gathered at those positions, [T, B, 1, D] instead of
  [T, 1, 1, D]; megatron's torch RoPE broadcasts it over heads as it does the shared table.

RoPE is relative, so a block mask alone would give the same result in exact arithmetic; the
positions still restart so that rounding, YaRN and long-context scaling see each example as it
would be alone (and as transformers computes it).
"""

from __future__ import annotations

import contextlib
import torch


def segment_positions(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] position of every token within its example (0 at each example's first token;
    padding continues counting, harmlessly: it is masked)."""
    B, T = segment_ids_BT.shape
    t = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    starts = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    starts[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first


def block_causal_mask(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where attention is NOT allowed (megatron's convention)."""
    T = segment_ids_BT.shape[1]
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids_BT.device).tril()
    allowed = same & causal
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids_BT.device)  # no empty rows (padding)
    return ~allowed[:, None]


def check_segments(segment_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> None:
    """Segments are 1, 2, ... in order over a row's real tokens and 0 exactly on its padding."""
    if segment_ids_BT.shape != attention_mask_BT.shape:
        raise ValueError(f"segment_ids has shape {tuple(segment_ids_BT.shape)}, input_ids "
                         f"{tuple(attention_mask_BT.shape)}")
    real = attention_mask_BT != 0
    if ((segment_ids_BT > 0) != real).any():
        raise ValueError("segment_ids: must be > 0 exactly where attention_mask is 1 (0 on padding)")
    step = segment_ids_BT[:, 1:] - segment_ids_BT[:, :-1]
    inner = real[:, 1:]
    if ((step != 0) & (step != 1) & inner).any() or (real[:, 0] & (segment_ids_BT[:, 0] != 1)).any():
        raise ValueError("segment_ids: each row must number its examples 1, 2, ... in order")


def _rotary_modules(model) -> list:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    return [m for m in model.modules() if isinstance(m, (RotaryEmbedding, YarnRotaryEmbedding))]


class PackedRope(contextlib.AbstractContextManager):
    """Within the block, every rotary embedding of `model` is taken at the positions last
    :meth:`set` (call it before each micro-batch's forward)."""

    def __init__(self, model):
        self.modules = _rotary_modules(model)
        self.positions_TB: torch.Tensor | None = None
        self._saved: list = []

    def set(self, position_ids_BT: torch.Tensor) -> None:
        self.positions_TB = position_ids_BT.t().long()

    def _gathered(self, original):
        def forward(max_seq_len, *args, **kwargs):
            positions = self.positions_TB
            if positions is None or int(max_seq_len) != positions.shape[0]:
                got = None if positions is None else positions.shape[0]
                raise RuntimeError(f"PackedRope: the model asked for {max_seq_len} positions, the packed "
                                   f"micro-batch has {got}")
            out = original(max(int(positions.max()) + 1, int(max_seq_len)), *args, **kwargs)
            table, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            emb = table[:, 0, 0][positions.to(table.device)].unsqueeze(2)  # [L, 1, 1, D] -> [T, B, 1, D]
            return emb if rest is None else (emb, *rest)
        return forward

    def __enter__(self):
        for m in self.modules:
            self._saved.append((m, m.__dict__.get("forward")))
            m.forward = self._gathered(m.forward)
        return self

    def __exit__(self, *exc):
        for m, previous in self._saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous
        self._saved.clear()
        return None
