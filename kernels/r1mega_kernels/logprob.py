"""Token log-probabilities and entropies from logits: one read of the logits forward, one backward.

Row n of the logits (n = s * T + t for [S, T, V] logits) predicts ``tokens[n]``. With
z = logits[n] / temperature (float32 math whatever the logit dtype):

    m = max_v z_v,  s = sum_v exp(z_v - m),  t = sum_v exp(z_v - m) * (z_v - m)
    logp = (z_y - m) - log s                     (y = tokens[n])
    H    = log s - t / s                         (entropy of softmax(z))

m, s and t are accumulated online over vocabulary tiles (``online_softmax_stats``): one pass, no
float32 copy of the logits, no stored softmax. t is kept relative to the running maximum, so
logits like 1e4 lose nothing to cancellation. Saved for the backward: m and log s per token (plus
H when the entropy is differentiated); the backward re-reads the logits once and writes

    d/dz_v = g_logp * (1[v = y] - p_v) - g_H * p_v * (log p_v + H),   p_v = exp(z_v - m - log s)

divided by the temperature, into a new buffer or into the logits buffer itself.

A vocabulary-parallel version needs only the per-shard partials (m, s, t, z_y when y is in the
shard) that ``online_softmax_stats`` already returns; combining them across ranks is
m = max m_r, s = sum s_r e^(m_r - m), t = sum e^(m_r - m) (t_r + (m_r - m) s_r).

Grid: one dimension over tokens, ``ROWS`` tokens per program (a power of two), so the number of
tokens is not bounded by the 65,535 limit of the second and third grid dimensions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from r1mega_kernels.launch import (
    TOKEN_ID_DTYPES,
    VALID_DTYPES,
    LaunchParams,
    RowLayout,
    check_tensor,
    launch_params,
    row_layout,
)


@triton.jit
def row_offsets(pid, n_rows, T, stride_s, stride_t, ROWS: tl.constexpr):
    """Rows of this program, whether each exists, and the int64 offset of each row's first logit."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    in_range = rows < n_rows
    rows64 = rows.to(tl.int64)
    offsets = (rows64 // T) * stride_s + (rows64 % T) * stride_t
    return rows, in_range, offsets


@triton.jit
def online_softmax_stats(
    logits_ptr, row_off, live, V, temperature, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, WITH_T: tl.constexpr
):
    """Running (m, s, t) over the vocabulary of each live row; dead rows are never read.

    m: max of z = logits / temperature; s = sum exp(z - m); t = sum exp(z - m) * (z - m) (only
    when WITH_T). Entries of -inf (banned tokens) contribute nothing; a row that is all -inf
    gives m = -inf, s = 0.
    """
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        load_mask = live[:, None] & (cols < V)[None, :]
        z = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=load_mask, other=float("-inf"))
        z = z.to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While a row has seen only -inf, shift by 0 so that exp() gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        zs = z - shift[:, None]
        e = tl.exp(zs)
        if WITH_T:
            # Re-centre the running t on the new maximum: e^(z-m)(z-m) = alpha e^(z-m_old)(z-m_old + m_old-m).
            t = alpha * (t + tl.where(s > 0.0, (m - shift) * s, 0.0))
            t += tl.sum(tl.where(e > 0.0, e * zs, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    return m, s, t


@triton.jit
def target_logit(logits_ptr, row_off, tokens, live, V, temperature):
    """z_y of each live row; -inf when the token id is outside [0, V) (probability 0, no OOB read)."""
    ok = live & (tokens >= 0) & (tokens < V)
    z = tl.load(logits_ptr + row_off + tokens, mask=ok, other=float("-inf"))
    return z.to(tl.float32) / temperature


@triton.jit
def _round_to_bfloat16(x):
    """Round float32 to the nearest bfloat16 (ties to even), still as float32.

    The value is then exactly representable, so the final cast is exact on every target: the
    CPU interpreter's float32 -> bfloat16 cast truncates, a GPU's rounds to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,
    tokens_ptr,
    valid_ptr,
    logp_ptr,
    entropy_ptr,
    row_max_ptr,
    row_logsum_ptr,
    n_rows,
    V,
    T,
    stride_s,
    stride_t,
    temperature,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    rows, in_range, row_off = row_offsets(tl.program_id(0), n_rows, T, stride_s, stride_t, ROWS)
    live = in_range
    if valid_ptr is not None:
        live = live & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    m, s, t = online_softmax_stats(logits_ptr, row_off, live, V, temperature, ROWS, BLOCK_V, WITH_ENTROPY)
    tokens = tl.load(tokens_ptr + rows, mask=live, other=0).to(tl.int64)
    z_y = target_logit(logits_ptr, row_off, tokens, live, V, temperature)
    s = tl.where(live, s, 1.0)  # rows not read: no log(0)
    log_s = tl.log(s)
    # (z_y - m) - log s, not z_y - (m + log s): exact for large logits, like torch.log_softmax.
    tl.store(logp_ptr + rows, tl.where(live, (z_y - m) - log_s, 0.0), mask=in_range)
    tl.store(row_max_ptr + rows, tl.where(live, m, 0.0), mask=in_range)
    tl.store(row_logsum_ptr + rows, log_s, mask=in_range)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(live, log_s - t / s, 0.0), mask=in_range)


@triton.jit
def _logprob_bwd_kernel(
    dlogits_ptr,
    logits_ptr,
    tokens_ptr,
    row_max_ptr,
    row_logsum_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    n_rows,
    V,
    T,
    stride_s,
    stride_t,
    out_stride_s,
    out_stride_t,
    temperature,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    """dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / temperature; may alias logits.

    Rows with zero incoming gradient (e.g. masked tokens) are written as zeros without reading the
    logits. In place (dlogits_ptr == logits_ptr with the same strides) each program reads a tile
    before it overwrites that same tile, and no other program touches its rows.
    """
    rows, in_range, row_off = row_offsets(tl.program_id(0), n_rows, T, stride_s, stride_t, ROWS)
    rows64 = rows.to(tl.int64)
    out_off = (rows64 // T) * out_stride_s + (rows64 % T) * out_stride_t
    g_lp = tl.load(grad_logp_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
    live = in_range & (g_lp != 0.0)
    if WITH_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
        h = tl.load(entropy_ptr + rows, mask=in_range, other=0.0)
        live = live | (in_range & (g_h != 0.0))
    m = tl.load(row_max_ptr + rows, mask=live, other=0.0)
    log_s = tl.load(row_logsum_ptr + rows, mask=live, other=0.0)
    tokens = tl.load(tokens_ptr + rows, mask=in_range, other=0).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        z = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=live[:, None] & col_ok, other=float("-inf"))
        log_p = (z.to(tl.float32) / temperature - m[:, None]) - log_s[:, None]
        p = tl.exp(log_p)
        coef = g_lp[:, None]
        if WITH_ENTROPY:
            # log p is -inf where p = 0: keep 0 * -inf out of the sum.
            coef += g_h[:, None] * tl.where(p > 0.0, log_p + h[:, None], 0.0)
        dz = tl.where(cols[None, :] == tokens[:, None], g_lp[:, None], 0.0) - p * coef
        dz = tl.where(live[:, None], dz / temperature, 0.0)
        if dlogits_ptr.dtype.element_ty == tl.bfloat16:
            dz = _round_to_bfloat16(dz)
        tl.store(
            dlogits_ptr + out_off[:, None] + cols[None, :],
            dz.to(dlogits_ptr.dtype.element_ty),
            mask=in_range[:, None] & col_ok,
        )


class LogprobForward(NamedTuple):
    """Per-token outputs, each float32 of the tokens' shape. ``entropy`` is None unless asked for."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    row_max: torch.Tensor  # m, saved for the backward
    row_logsum: torch.Tensor  # log s, saved for the backward


def check_tokens(tokens: object, layout: RowLayout, logits: torch.Tensor) -> torch.Tensor:
    """`tokens` checked: integer ids shaped like ``logits[..., 0]``, on the logits' device."""
    shape = (layout.T,) if logits.dim() == 2 else (layout.S, layout.T)
    return check_tensor("tokens", tokens, dtypes=TOKEN_ID_DTYPES, shape=shape, like="logits[..., 0]",
                        device=logits.device)


def check_temperature(temperature: object) -> float:
    """`temperature` as a float; ValueError unless it is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if temperature == float("inf"):
        raise ValueError("temperature must be finite")
    return float(temperature)


def _grid(layout: RowLayout, params: LaunchParams) -> tuple[int]:
    return (triton.cdiv(layout.n_rows, params.rows),)


def logprob_forward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    valid: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    block_v: int | None = None,
) -> LogprobForward:
    """log softmax(logits / temperature)[tokens] (and the entropy), one pass over the logits.

    Args:
        logits: [N, V] or [S, T, V], float32/bfloat16/float16, contiguous in V (leading strides free).
        tokens: [N] or [S, T] int32/int64, contiguous; row n of the logits predicts tokens[n].
        temperature: > 0, applied inside (z = logits / temperature).
        with_entropy: also return the entropy of softmax(z).
        valid: optional, tokens' shape, bool/int8/uint8, contiguous: rows where it is 0 are not read
            (padding); their logp and entropy are 0 and their token ids are ignored.
        rows_per_program, block_v: tile sizes (powers of two); default per target.
    """
    layout = row_layout("logits", logits)
    check_tokens(tokens, layout, logits)
    temperature = check_temperature(temperature)
    if valid is not None:
        check_tensor("valid", valid, dtypes=VALID_DTYPES, shape=tuple(tokens.shape), like="tokens",
                     device=logits.device)
    params = launch_params(logits.device, layout.V, rows_per_program, block_v)
    out = [torch.empty(tokens.shape, dtype=torch.float32, device=logits.device) for _ in range(4)]
    logp, entropy, row_max, row_logsum = out
    if layout.n_rows:
        _logprob_fwd_kernel[_grid(layout, params)](
            logits, tokens, valid, logp, entropy, row_max, row_logsum,
            layout.n_rows, layout.V, layout.T, layout.stride_s, layout.stride_t, temperature,
            ROWS=params.rows, BLOCK_V=params.block_v, WITH_ENTROPY=bool(with_entropy), num_warps=params.num_warps,
        )
    return LogprobForward(logp, entropy if with_entropy else None, row_max, row_logsum)


def logprob_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    temperature: float = 1.0,
    out: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """d(loss)/d(logits) from the per-token gradients of logp (and entropy): one more pass.

    Args:
        logits, tokens, temperature: as given to :func:`logprob_forward`.
        row_max, row_logsum: from :func:`logprob_forward` (tokens' shape, float32).
        grad_logp: tokens' shape; d(loss)/d(logp). Rows where it (and grad_entropy) is 0 get zeros.
        entropy, grad_entropy: both or neither; the entropy from the forward and d(loss)/d(H).
        out: where to write the gradient (logits' shape and dtype, contiguous in V); pass
            ``logits`` itself to overwrite the logits in place. Default: a new tensor.

    Returns:
        ``out`` (or the new tensor) holding the gradient in the logits' dtype.
    """
    layout = row_layout("logits", logits)
    check_tokens(tokens, layout, logits)
    temperature = check_temperature(temperature)
    floats = (torch.float32,)
    for name, x in (("row_max", row_max), ("row_logsum", row_logsum)):
        check_tensor(name, x, dtypes=floats, shape=tuple(tokens.shape), like="tokens", device=logits.device)
    grad_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    check_tensor("grad_logp", grad_logp, dtypes=grad_dtypes, shape=tuple(tokens.shape), like="tokens",
                 device=logits.device)
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must be given together")
    if entropy is not None:
        check_tensor("entropy", entropy, dtypes=floats, shape=tuple(tokens.shape), like="tokens",
                     device=logits.device)
        check_tensor("grad_entropy", grad_entropy, dtypes=grad_dtypes, shape=tuple(tokens.shape), like="tokens",
                     device=logits.device)
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    out_layout = row_layout("out", out, dtypes=(logits.dtype,))
    if out.shape != logits.shape or out.device != logits.device:
        raise ValueError(f"out must have the shape and device of logits {tuple(logits.shape)}, got {tuple(out.shape)}")
    if out.data_ptr() == logits.data_ptr() and out.stride() != logits.stride():
        raise ValueError("out aliases logits with different strides; pass logits itself for an in-place gradient")
    params = launch_params(logits.device, layout.V, rows_per_program, block_v)
    if layout.n_rows:
        with_entropy = entropy is not None
        _logprob_bwd_kernel[_grid(layout, params)](
            out, logits, tokens, row_max, row_logsum,
            entropy if with_entropy else row_max, grad_logp, grad_entropy if with_entropy else grad_logp,
            layout.n_rows, layout.V, layout.T, layout.stride_s, layout.stride_t,
            out_layout.stride_s, out_layout.stride_t, temperature,
            ROWS=params.rows, BLOCK_V=params.block_v, WITH_ENTROPY=with_entropy, num_warps=params.num_warps,
        )
    return out
