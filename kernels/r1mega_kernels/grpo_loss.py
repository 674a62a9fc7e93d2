"""Fused GRPO / PPO per-token loss: log-prob, ratio, clipping, KL, TIS and dL/dlogp in one pass.

Per token (A the advantage, valid = mask != 0; inputs at invalid tokens are never read and every
output there is 0), the terms of r1mega.algo.policy_loss, in float32:

    logp   = log softmax(logits / temperature)[y]      (see r1mega_kernels.logprob)
    r      = exp(clamp(q, -B, B)),  q = logp - old_logp, or the sequence's log-ratio for GSPO
    pg     = max(-A r, -A clamp(r, 1 - eps_low, 1 + eps_high)), then min(pg, -A c) where A < 0
             with dual_clip = c
    w      = min(exp(clamp(old_logp - rollout_logp, -B, B)), tis_cap)     (1 without rollout_logp)
    kl     = k1 / k2 / k3 of d = ref_logp - logp, optional clamps; "+" variants: k2's gradient
    L      = w pg + kl_coef kl
    dL     = dL / dlogp  (GSPO: with the sequence factor detached, as in the reference)

plus the clip indicators (bit 1: ratio below 1 - eps_low with A < 0, bit 2: above 1 + eps_high
with A > 0, bit 4: dual clip active). B is the log-ratio bound (20, verl's). Derivatives of max,
min and clamp follow torch's conventions (ties split the gradient evenly, clamp bounds pass it).

Aggregation is not done here: the caller weights L by its aggregation weight w_t (1 / global
tokens, ...), so d(loss)/d(logits) = w_t dL (1[v = y] - softmax(z)_v) / temperature, which
:func:`r1mega_kernels.logprob.logprob_backward` computes in one more pass with
grad_logp = w_t dL (optionally in place into the logits).

Launchers: :func:`grpo_forward` (token-level ratio: one pass over the logits with the per-token
terms as its epilogue) and :func:`grpo_token_terms` (the same epilogue alone over [N] log-probs,
for GSPO, whose ratio needs the sequence mean of the log-probs first).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from r1mega_kernels.launch import (
    TOKEN_FLOAT_DTYPES,
    VALID_DTYPES,
    check_tensor,
    launch_params,
    next_power_of_two,
    row_layout,
)
from r1mega_kernels.logprob import (
    check_temperature,
    check_tokens,
    online_softmax_stats,
    row_offsets,
    target_logit,
)

KL_ESTIMATORS = ("k1", "k2", "k3", "k1+", "k3+")
_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
FLAG_CLIP_LOW, FLAG_CLIP_HIGH, FLAG_DUAL_CLIP = 1, 2, 4


@triton.jit
def _expm1(x):
    """exp(x) - 1 accurate for small |x| (Kahan): (u - 1) x / log(u) with u = exp(x)."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe_log = tl.where((u == 1.0) | (um1 == -1.0) | (u == float("inf")), 1.0, tl.log(u))
    return tl.where(u == 1.0, x, tl.where((um1 == -1.0) | (u == float("inf")), um1, um1 * x / safe_log))


@triton.jit
def _half_if_tie(a, b):
    """Share of d max(a, b) that goes to a: 1 if a > b, 1/2 on a tie (torch's convention), else 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _grpo_token_terms(
    rows, in_range, valid, logp,
    old_ptr, adv_ptr, ref_ptr, rollout_ptr, seq_ratio_ptr,
    loss_ptr, dloss_ptr, ratio_ptr, kl_ptr, tis_ptr, flags_ptr,
    clip_low, clip_high, dual_clip, kl_coef, kl_clamp, tis_cap, bound,
    HAS_DUAL: tl.constexpr, KL_MODE: tl.constexpr, KL_PLUS: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, HAS_TIS_CAP: tl.constexpr,
):
    """Per-token loss, dL/dlogp, ratio, KL, TIS weight and clip flags; stores them (0 where invalid)."""
    zero = tl.zeros_like(logp)
    logp = tl.where(valid, logp, zero)
    old = tl.load(old_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    if seq_ratio_ptr is not None:
        # GSPO: the value is the sequence's log-ratio, the gradient that of logp (factor detached).
        q = tl.load(seq_ratio_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    else:
        q = logp - old
    ratio = tl.exp(tl.minimum(tl.maximum(q, -bound), bound))
    d_ratio = tl.where((q >= -bound) & (q <= bound), ratio, 0.0)  # d ratio / d logp

    clipped = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    unclipped_pg = -adv * ratio
    clipped_pg = -adv * clipped
    pg = tl.maximum(unclipped_pg, clipped_pg)
    in_clip_range = (ratio >= clip_low) & (ratio <= clip_high)
    d_pg = -adv * (
        _half_if_tie(unclipped_pg, clipped_pg) + tl.where(in_clip_range, _half_if_tie(clipped_pg, unclipped_pg), 0.0)
    )
    flags = tl.where((ratio < clip_low) & (adv < 0.0), 1, 0) + tl.where((ratio > clip_high) & (adv > 0.0), 2, 0)
    if HAS_DUAL:
        dual_bound = -adv * dual_clip
        negative = adv < 0.0
        flags += tl.where(negative & (pg > dual_bound), 4, 0)
        d_pg = tl.where(negative, d_pg * _half_if_tie(dual_bound, pg), d_pg)
        pg = tl.where(negative, tl.minimum(pg, dual_bound), pg)
    loss = pg
    dloss = d_pg * d_ratio
    if rollout_ptr is not None:
        rollout = tl.load(rollout_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        w = tl.exp(tl.minimum(tl.maximum(old - rollout, -bound), bound))
        if HAS_TIS_CAP:
            w = tl.minimum(w, tis_cap)
        loss = w * pg
        dloss = w * dloss
        tl.store(tis_ptr + rows, tl.where(valid, w, zero), mask=in_range)
    if KL_MODE != 0:
        ref = tl.load(ref_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        d = ref - logp
        if KL_MODE == 1:
            kl = -d
            d_kl = tl.full(d.shape, 1.0, tl.float32)
        elif KL_MODE == 2:
            kl = 0.5 * (d * d)
            d_kl = -d
        else:
            if HAS_KL_CLAMP:
                dc = tl.minimum(tl.maximum(d, -bound), bound)
                d_kl_pass = (d >= -bound) & (d <= bound)
            else:
                dc = d
                d_kl_pass = d == d
            em1 = _expm1(dc)
            kl = em1 - dc
            d_kl = tl.where(d_kl_pass, -em1, 0.0)
        if HAS_KL_CLAMP:
            d_kl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), d_kl, 0.0)
            kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
        if KL_PLUS:
            d_kl = -d  # straight-through: the estimator's value, k2's gradient
        if KL_IN_LOSS:
            loss = loss + kl_coef * kl
            dloss = dloss + kl_coef * d_kl
        tl.store(kl_ptr + rows, tl.where(valid, kl, zero), mask=in_range)
    tl.store(loss_ptr + rows, tl.where(valid, loss, zero), mask=in_range)
    tl.store(dloss_ptr + rows, tl.where(valid, dloss, zero), mask=in_range)
    tl.store(ratio_ptr + rows, tl.where(valid, ratio, zero), mask=in_range)
    tl.store(flags_ptr + rows, tl.where(valid, flags, 0).to(tl.int8), mask=in_range)


@triton.jit
def _grpo_loss_fwd_kernel(
    logits_ptr, tokens_ptr, valid_ptr, old_ptr, adv_ptr, ref_ptr, rollout_ptr,
    logp_ptr, row_max_ptr, row_logsum_ptr, loss_ptr, dloss_ptr, ratio_ptr, kl_ptr, tis_ptr, flags_ptr,
    n_rows, V, T, stride_s, stride_t, temperature,
    clip_low, clip_high, dual_clip, kl_coef, kl_clamp, tis_cap, bound,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DUAL: tl.constexpr, KL_MODE: tl.constexpr, KL_PLUS: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, HAS_TIS_CAP: tl.constexpr,
):
    """Token-level ratio: one pass over the logits of the valid tokens, the loss terms as epilogue."""
    rows, in_range, row_off = row_offsets(tl.program_id(0), n_rows, T, stride_s, stride_t, ROWS)
    valid = in_range & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    m, s, _ = online_softmax_stats(logits_ptr, row_off, valid, V, temperature, ROWS, BLOCK_V, False)
    tokens = tl.load(tokens_ptr + rows, mask=valid, other=0).to(tl.int64)
    z_y = target_logit(logits_ptr, row_off, tokens, valid, V, temperature)
    log_s = tl.log(tl.where(valid, s, 1.0))
    logp = tl.where(valid, (z_y - m) - log_s, 0.0)
    tl.store(logp_ptr + rows, logp, mask=in_range)
    tl.store(row_max_ptr + rows, tl.where(valid, m, 0.0), mask=in_range)
    tl.store(row_logsum_ptr + rows, log_s, mask=in_range)
    _grpo_token_terms(
        rows, in_range, valid, logp, old_ptr, adv_ptr, ref_ptr, rollout_ptr, None,
        loss_ptr, dloss_ptr, ratio_ptr, kl_ptr, tis_ptr, flags_ptr,
        clip_low, clip_high, dual_clip, kl_coef, kl_clamp, tis_cap, bound,
        HAS_DUAL, KL_MODE, KL_PLUS, HAS_KL_CLAMP, KL_IN_LOSS, HAS_TIS_CAP,
    )


@triton.jit
def _grpo_token_terms_kernel(
    logp_ptr, valid_ptr, old_ptr, adv_ptr, ref_ptr, rollout_ptr, seq_ratio_ptr,
    loss_ptr, dloss_ptr, ratio_ptr, kl_ptr, tis_ptr, flags_ptr,
    n_rows, clip_low, clip_high, dual_clip, kl_coef, kl_clamp, tis_cap, bound,
    BLOCK: tl.constexpr,
    HAS_DUAL: tl.constexpr, KL_MODE: tl.constexpr, KL_PLUS: tl.constexpr, HAS_KL_CLAMP: tl.constexpr,
    KL_IN_LOSS: tl.constexpr, HAS_TIS_CAP: tl.constexpr,
):
    """Elementwise over [N] log-probs (GSPO: seq_ratio_ptr holds each token's sequence log-ratio)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    valid = in_range & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
    logp = tl.load(logp_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    _grpo_token_terms(
        rows, in_range, valid, logp, old_ptr, adv_ptr, ref_ptr, rollout_ptr, seq_ratio_ptr,
        loss_ptr, dloss_ptr, ratio_ptr, kl_ptr, tis_ptr, flags_ptr,
        clip_low, clip_high, dual_clip, kl_coef, kl_clamp, tis_cap, bound,
        HAS_DUAL, KL_MODE, KL_PLUS, HAS_KL_CLAMP, KL_IN_LOSS, HAS_TIS_CAP,
    )


class GrpoTokenTerms(NamedTuple):
    """Per-token outputs, each of the tokens' shape and 0 at invalid tokens.

    loss: L (float32); dloss: dL/dlogp (float32); ratio: the importance ratio r; kl: the KL
    estimator's value (None without ref_logp); tis_weight: w (None without rollout_logp);
    clip_flags: int8 bit set (1 low, 2 high, 4 dual). logp, row_max, row_logsum: only from
    :func:`grpo_forward` (None from :func:`grpo_token_terms`); the last two feed the backward.
    """

    loss: torch.Tensor
    dloss: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    tis_weight: torch.Tensor | None
    clip_flags: torch.Tensor
    logp: torch.Tensor | None = None
    row_max: torch.Tensor | None = None
    row_logsum: torch.Tensor | None = None


def _real(name: str, value: object, *, low: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


def _loss_options(
    eps_low, eps_high, dual_clip, kl_estimator, kl_coef, kl_clamp, tis_cap, log_ratio_bound, has_ref, has_rollout
) -> tuple[tuple[float, ...], dict[str, object]]:
    """Runtime scalars and constexpr flags of the loss epilogue, validated."""
    eps_low = _real("eps_low", eps_low, low=0.0)
    eps_high = _real("eps_high", eps_high, low=0.0)
    if dual_clip is not None:
        dual_clip = _real("dual_clip", dual_clip, low=1.0, strict=True)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    kl_coef = _real("kl_coef", kl_coef)
    if kl_coef != 0.0 and not has_ref:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logp")
    if kl_clamp is not None:
        kl_clamp = _real("kl_clamp", kl_clamp, low=0.0, strict=True)
    if tis_cap is not None:
        tis_cap = _real("tis_cap", tis_cap, low=0.0, strict=True)
        if not has_rollout:
            raise ValueError("tis_cap needs rollout_logp")
    bound = _real("log_ratio_bound", log_ratio_bound, low=0.0, strict=True)
    # 1 - eps and 1 + eps rounded once from Python floats, like the torch reference's scalars.
    scalars = (1.0 - eps_low, 1.0 + eps_high, dual_clip or 0.0, kl_coef, kl_clamp or 0.0, tis_cap or 0.0, bound)
    flags = dict(
        HAS_DUAL=dual_clip is not None,
        KL_MODE=_KL_CODES[kl_estimator.rstrip("+")] if has_ref else 0,
        KL_PLUS=kl_estimator.endswith("+"),
        HAS_KL_CLAMP=kl_clamp is not None,
        KL_IN_LOSS=has_ref and kl_coef != 0.0,
        HAS_TIS_CAP=tis_cap is not None,
    )
    return scalars, flags


def _check_token_inputs(shape, device, valid, old_logp, advantages, ref_logp, rollout_logp, seq_log_ratio=None):
    check_tensor("valid", valid, dtypes=VALID_DTYPES, shape=shape, like="tokens", device=device)
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp),
                    ("rollout_logp", rollout_logp), ("seq_log_ratio", seq_log_ratio)):
        if x is not None or name in ("old_logp", "advantages"):
            check_tensor(name, x, dtypes=TOKEN_FLOAT_DTYPES, shape=shape, like="tokens", device=device)


def _token_outputs(shape, device, has_ref, has_rollout):
    def new(dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    return new(), new(), new(), new() if has_ref else None, new() if has_rollout else None, new(torch.int8)


def grpo_forward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    kl_estimator: str = "k3",
    kl_coef: float = 0.0,
    kl_clamp: float | None = None,
    tis_cap: float | None = None,
    log_ratio_bound: float = 20.0,
    rows_per_program: int | None = None,
    block_v: int | None = None,
) -> GrpoTokenTerms:
    """Per-token GRPO terms with the token-level ratio, in one pass over the logits.

    Args:
        logits: [N, V] or [S, T, V] float32/bfloat16/float16, contiguous in V; row n predicts tokens[n].
        tokens: [N] or [S, T] int32/int64, contiguous. Ids at invalid tokens are never read.
        valid: tokens' shape, bool/int8/uint8, contiguous; nonzero marks a token that counts.
        old_logp, advantages (per token: expand [S] advantages first), ref_logp, rollout_logp:
            tokens' shape, contiguous, any float dtype (read as float32).
        temperature, eps_low, eps_high, dual_clip, kl_estimator, kl_coef, kl_clamp, tis_cap: as in
            r1mega.algo.policy_loss. The KL value is computed whenever ref_logp is given; it enters
            the loss only when kl_coef != 0.
        log_ratio_bound: B above.
        rows_per_program, block_v: tile sizes (powers of two); default per target.
    """
    layout = row_layout("logits", logits)
    check_tokens(tokens, layout, logits)
    shape = tuple(tokens.shape)
    _check_token_inputs(shape, logits.device, valid, old_logp, advantages, ref_logp, rollout_logp)
    temperature = check_temperature(temperature)
    scalars, flags = _loss_options(eps_low, eps_high, dual_clip, kl_estimator, kl_coef, kl_clamp, tis_cap,
                                   log_ratio_bound, ref_logp is not None, rollout_logp is not None)
    params = launch_params(logits.device, layout.V, rows_per_program, block_v)
    loss, dloss, ratio, kl, tis, clip_flags = _token_outputs(shape, logits.device, ref_logp is not None,
                                                             rollout_logp is not None)
    logp, row_max, row_logsum = (torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(3))
    if layout.n_rows:
        _grpo_loss_fwd_kernel[(triton.cdiv(layout.n_rows, params.rows),)](
            logits, tokens, valid, old_logp, advantages, ref_logp, rollout_logp,
            logp, row_max, row_logsum, loss, dloss, ratio, kl, tis, clip_flags,
            layout.n_rows, layout.V, layout.T, layout.stride_s, layout.stride_t, temperature, *scalars,
            ROWS=params.rows, BLOCK_V=params.block_v, num_warps=params.num_warps, **flags,
        )
    return GrpoTokenTerms(loss, dloss, ratio, kl, tis, clip_flags, logp, row_max, row_logsum)


def grpo_token_terms(
    logp: torch.Tensor,
    valid: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    seq_log_ratio: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    kl_estimator: str = "k3",
    kl_coef: float = 0.0,
    kl_clamp: float | None = None,
    tis_cap: float | None = None,
    log_ratio_bound: float = 20.0,
    block: int | None = None,
) -> GrpoTokenTerms:
    """The per-token terms of :func:`grpo_forward` from given log-probs (elementwise, [N] work).

    seq_log_ratio (logp's shape): for GSPO, each token's sequence log-ratio (the masked mean of
    logp - old_logp over its sequence); None: the token-level ratio. Other arguments: see
    :func:`grpo_forward`; every tensor has logp's shape and is contiguous.
    """
    check_tensor("logp", logp, dtypes=TOKEN_FLOAT_DTYPES)
    shape = tuple(logp.shape)
    _check_token_inputs(shape, logp.device, valid, old_logp, advantages, ref_logp, rollout_logp, seq_log_ratio)
    scalars, flags = _loss_options(eps_low, eps_high, dual_clip, kl_estimator, kl_coef, kl_clamp, tis_cap,
                                   log_ratio_bound, ref_logp is not None, rollout_logp is not None)
    n = logp.numel()
    if block is None:
        block = min(max(next_power_of_two(n), 16), 1024)
    loss, dloss, ratio, kl, tis, clip_flags = _token_outputs(shape, logp.device, ref_logp is not None,
                                                             rollout_logp is not None)
    if n:
        _grpo_token_terms_kernel[(triton.cdiv(n, block),)](
            logp, valid, old_logp, advantages, ref_logp, rollout_logp, seq_log_ratio,
            loss, dloss, ratio, kl, tis, clip_flags, n, *scalars, BLOCK=block, **flags,
        )
    return GrpoTokenTerms(loss, dloss, ratio, kl, tis, clip_flags)
