"""Per-shard softmax partials for vocabulary-parallel logits: one read of the shard forward.

With the vocabulary split over tensor-parallel ranks (rank r holds the logits of ids
[vocab_start, vocab_start + V) as a [N, V] or [S, T, V] shard), each rank computes for every
token, over its own shard only, with z = logits / temperature in float32:

    m_r = max_v z_v,   s_r = sum_v exp(z_v - m_r),   t_r = sum_v exp(z_v - m_r) (z_v - m_r)
    z_y                 (the target logit, when y - vocab_start falls in [0, V); else -inf)

These are the quantities of r1mega_kernels.logprob's online log-sum-exp, stopped before the
normaliser; r1mega.ops.vocab_parallel combines them over the ranks with two all-reduces of
per-token floats (never of [N, V]):

    M = max_r m_r                                   (all-reduce MAX)
    S = sum_r s_r e^(m_r - M),  Z_y = sum_r z_y[owner],  T = sum_r e^(m_r - M) (t_r + (m_r - M) s_r)
                                                    (one all-reduce SUM of the stacked terms)
    logp = (Z_y - M) - log S,   H = log S - T / S

The backward needs no new kernel: r1mega_kernels.logprob.logprob_backward applied to the shard
with the GLOBAL M and log S and the token ids shifted by -vocab_start (ids outside the shard match
no column) gives exactly this shard's slice of d(loss)/d(logits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from r1mega_kernels.launch import VALID_DTYPES, check_tensor, launch_params, row_layout
from r1mega_kernels.logprob import (
    check_temperature,
    check_tokens,
    online_softmax_stats,
    row_offsets,
    target_logit,
)


@triton.jit
def _logprob_partials_kernel(
    logits_ptr,
    tokens_ptr,
    valid_ptr,
    row_max_ptr,
    sum_exp_ptr,
    sum_exp_shifted_ptr,
    target_ptr,
    n_rows,
    V,
    T,
    stride_s,
    stride_t,
    vocab_start,
    temperature,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_T: tl.constexpr,
):
    rows, in_range, row_off = row_offsets(tl.program_id(0), n_rows, T, stride_s, stride_t, ROWS)
    live = in_range
    if valid_ptr is not None:
        live = live & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    m, s, t = online_softmax_stats(logits_ptr, row_off, live, V, temperature, ROWS, BLOCK_V, WITH_T)
    tokens = tl.load(tokens_ptr + rows, mask=live, other=0).to(tl.int64) - vocab_start
    z_y = target_logit(logits_ptr, row_off, tokens, live, V, temperature)  # -inf outside the shard
    tl.store(row_max_ptr + rows, tl.where(live, m, 0.0), mask=in_range)
    tl.store(sum_exp_ptr + rows, tl.where(live, s, 0.0), mask=in_range)
    tl.store(target_ptr + rows, tl.where(live, z_y, 0.0), mask=in_range)
    if WITH_T:
        tl.store(sum_exp_shifted_ptr + rows, tl.where(live, t, 0.0), mask=in_range)


class LogprobPartials(NamedTuple):
    """Per-token partials of one vocabulary shard, each float32 of the tokens' shape (0 at skipped rows).

    row_max: m_r; sum_exp: s_r; sum_exp_shifted: t_r (None unless asked for); target_logit: z_y
    where the token's id falls in this shard, -inf where it does not.
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_shifted: torch.Tensor | None
    target_logit: torch.Tensor


def logprob_partials(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    vocab_start: int = 0,
    temperature: float = 1.0,
    with_entropy: bool = False,
    valid: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    block_v: int | None = None,
) -> LogprobPartials:
    """Softmax partials of a vocabulary shard, one pass over it (see the module docstring).

    Args:
        logits: this rank's shard, [N, V] or [S, T, V] float32/bfloat16/float16, contiguous in V
            (leading strides free); column v is the global vocabulary id vocab_start + v.
        tokens: [N] or [S, T] int32/int64 GLOBAL token ids, contiguous.
        vocab_start: the global id of the shard's first column (rank * V for megatron's layout).
        temperature: > 0, applied inside.
        with_entropy: also compute t_r (needed for the entropy).
        valid: optional, tokens' shape, bool/int8/uint8: rows where it is 0 are not read (all 0).
        rows_per_program, block_v: tile sizes (powers of two); default per target.
    """
    layout = row_layout("logits", logits)
    check_tokens(tokens, layout, logits)
    temperature = check_temperature(temperature)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    if valid is not None:
        check_tensor("valid", valid, dtypes=VALID_DTYPES, shape=tuple(tokens.shape), like="tokens",
                     device=logits.device)
    params = launch_params(logits.device, layout.V, rows_per_program, block_v)
    row_max, sum_exp, shifted, target = (
        torch.empty(tokens.shape, dtype=torch.float32, device=logits.device) for _ in range(4)
    )
    if layout.n_rows:
        _logprob_partials_kernel[(triton.cdiv(layout.n_rows, params.rows),)](
            logits, tokens, valid, row_max, sum_exp, shifted, target,
            layout.n_rows, layout.V, layout.T, layout.stride_s, layout.stride_t, vocab_start, temperature,
            ROWS=params.rows, BLOCK_V=params.block_v, WITH_T=bool(with_entropy), num_warps=params.num_warps,
        )
    return LogprobPartials(row_max, sum_exp, shifted if with_entropy else None, target)
