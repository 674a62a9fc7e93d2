"""The dense attention mask of a THD (packed, cu_seqlens) batch.

megatron-core 0.16.1's local ``DotProductAttention`` has no THD path (Transformer Engine's fused
kernels do); :mod:`r1mega.megatron_compat.local_spec` (patch 12) computes THD attention as one
batch row under this mask. A pure function of ``cu_seqlens``: ``r1mega.models.packing`` re-exports
it for the policy's packed batches and tests.
"""

from __future__ import annotations

import torch


def thd_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, N, N] bool, True where attention is NOT allowed, for the sequences of `cu_seqlens`
    (attention within a sequence, causal): what THD attention computes, as a dense mask."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.bucketize(t, cu_seqlens[1:].long(), right=True)
    allowed = (seq[:, None] == seq[None, :]) & (t[None, :] <= t[:, None])
    return ~allowed[None, None]
