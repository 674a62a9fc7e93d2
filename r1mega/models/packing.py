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


# ---------------------------------------------------------------------------------------------
# THD: every sequence's tokens back to back, described by cu_seqlens
# ---------------------------------------------------------------------------------------------
class ThdBatch:
    """A micro-batch of right-padded [B, T] rows in megatron's THD layout: the real tokens of
    every sequence (a row, or each example of a packed row) back to back in one [1, N] row, no
    padding between them; ``cu_seqlens`` [n_seq + 1] (int32) marks where each starts. A tail of
    padding tokens, its own sequence, brings N to `total` (sequence parallelism needs N divisible
    by the TP size; pipeline stages exchange a fixed shape).

    Attributes: ``input_ids`` and ``position_ids`` [1, N], ``padding_mask`` [1, N] (True on the
    tail), ``cu_seqlens``, ``max_seqlen``, ``index`` [n_real] (flat position in the [B, T] rows of
    each packed token), ``shape`` (B, T).
    """

    def __init__(self, input_ids_BT: torch.Tensor, segment_ids_BT: torch.Tensor, *, total: int):
        B, T = input_ids_BT.shape
        real = segment_ids_BT > 0
        self.shape = (B, T)
        self.index = real.reshape(-1).nonzero().squeeze(1)
        n_real = int(self.index.numel())
        if total < n_real:
            raise ValueError(f"ThdBatch: {n_real} real tokens do not fit in {total}")
        # a new sequence starts where the row or the segment changes
        row = torch.arange(B, device=input_ids_BT.device).unsqueeze(1).expand(B, T).reshape(-1)[self.index]
        seg = segment_ids_BT.reshape(-1)[self.index]
        starts = torch.ones(n_real, dtype=torch.bool, device=input_ids_BT.device)
        starts[1:] = (row[1:] != row[:-1]) | (seg[1:] != seg[:-1])
        bounds = starts.nonzero().squeeze(1).tolist() + [n_real]
        if total > n_real:
            bounds.append(total)
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=input_ids_BT.device)
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        self.max_seqlen = int(lengths.max()) if lengths.numel() else 0
        flat_ids = input_ids_BT.reshape(-1)[self.index]
        self.input_ids = torch.cat([flat_ids, flat_ids.new_zeros(total - n_real)]).unsqueeze(0)
        t = torch.arange(total, device=input_ids_BT.device)
        seq_of_token = torch.bucketize(t, self.cu_seqlens[1:].long(), right=True)
        self.position_ids = (t - self.cu_seqlens.long()[seq_of_token]).unsqueeze(0)
        self.padding_mask = (t >= n_real).unsqueeze(0)

    def packed_seq_params(self):
        """megatron's PackedSeqParams (qkv_format "thd") of this batch."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def pack(self, x_BT: torch.Tensor) -> torch.Tensor:
        """Per-position values [B, T, ...] laid out as the packed tokens, [1, N, ...] (zeros on the tail)."""
        B, T = self.shape
        rest = tuple(x_BT.shape[2:])
        real = x_BT.reshape((B * T,) + rest)[self.index.to(x_BT.device)]
        tail = real.new_zeros((self.input_ids.shape[1] - real.shape[0],) + rest)
        return torch.cat([real, tail]).unsqueeze(0)

    def unpack(self, out_1N: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] per-token outputs back to the [B, T, ...] rows (zeros on padding);
        differentiable."""
        B, T = self.shape
        rest = tuple(out_1N.shape[2:])
        real = out_1N[0, : self.index.numel()]
        full = out_1N.new_zeros((B * T,) + rest).index_copy(0, self.index, real)
        return full.reshape((B, T) + rest)
