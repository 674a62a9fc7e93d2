"""Clipped GRPO / PPO policy loss: importance ratio, clipping, KL penalty, TIS and aggregation.

Shape legend: S sequences (completions) in the micro-batch, T token positions (completions are
right-padded to T). ``_ST`` tensors are [S, T], ``_S`` tensors are [S].

Micro-batching and data parallelism: every aggregation is a sum over tokens divided by a
denominator. Pass the denominator of the WHOLE mini-batch (all micro-batches on all ranks) as
``global_tokens`` / ``global_sequences``; then the full mini-batch's loss and gradient are the
SUM of the micro-batch losses and gradients over micro-batches and ranks. :func:`local_denominators`
gives the per-micro-batch counts to sum (e.g. with an all_reduce in the trainer).

Reproducing verl and TRL (global_* as defined above; a trainer whose gradient reduction AVERAGES
over R ranks, like DDP/FSDP, must multiply the loss by R, which verl does with ``* dp_size``):

verl (core_algos.py, new model engine with global batch info):
    policy_loss="vanilla"          eps_low/eps_high = clip_ratio_low/high, dual_clip=clip_ratio_c (3.0)
    policy_loss="gspo"             ratio_level="sequence", agg="seq-mean-token-mean", dual_clip=None
                                   (verl caps the log-ratio at 10, we clamp to +-20: same while
                                   |sequence log-ratio| < 10)
    token-mean                     agg="token-mean", global_tokens=batch_num_tokens
    seq-mean-token-mean / -sum     same agg, global_sequences=global_batch_size
    seq-mean-token-sum-norm        same agg, global_sequences=global_batch_size,
                                   norm_length=loss_scale_factor (default response length = T).
                                   verl before PR #5417 (Feb 2026) had no sequence mean here,
                                   sum(L*M) / loss_scale_factor: pass global_sequences=1.
    kl_loss_type low_var_kl / k3   kl_estimator="k3", kl_clamp=10.0, kl_coef=kl_loss_coef
    kl_loss_type k3+               kl_estimator="k3+", kl_clamp=10.0
    kl_loss_type kl / k1, k1+, mse / k2   "k1", "k1+", "k2" with kl_clamp=None
    token-level rollout IS weights truncated at C: rollout_logp, tis_cap=C
TRL GRPOTrainer (S_mb rows in this micro-batch, GA accumulation steps, P processes):
    epsilon / epsilon_high         eps_low / eps_high, dual_clip=None (no ``delta``)
    beta                           kl_coef=beta, kl_estimator="k3", kl_clamp=None
    importance_sampling_level="sequence"   ratio_level="sequence" (same values and gradients)
    loss_type="grpo"               agg="seq-mean-token-mean", global_sequences=S_mb*GA*P
                                   (TRL counts fully masked rows too)
    loss_type="bnpo"               agg="token-mean", global_tokens=max(tokens in micro-batch, 1)*GA*P
    loss_type="dr_grpo"            agg="seq-mean-token-sum-norm", global_sequences=S_mb*GA*P,
                                   norm_length=max_completion_length
    loss_type="dapo"               agg="token-mean", global_tokens=num_items_in_batch
TRL exponentiates the log-ratio without a clamp; we clamp it to +-20 (verl's bound), which only
matters for ratios beyond e^20.
"""

from __future__ import annotations

from functools import reduce

import torch
import torch.nn.functional as F

from r1mega.algo.checks import check_choice, check_floating, check_shape, describe
from r1mega.algo.loss_spec import AGG_MODES, LossSpec

# Log-ratios are clamped to +-20 before exp() (verl's bound) so ratios and gradients stay finite.
LOG_RATIO_BOUND = 20.0


def local_denominators(mask: torch.Tensor, agg: str) -> dict[str, torch.Tensor]:
    """The counts of one micro-batch that make up the global denominator ``agg`` uses.

    Sum them over the micro-batches and data-parallel ranks of a mini-batch and pass the result
    to :func:`policy_loss` as keyword arguments. For a single micro-batch on one rank these
    are the defaults policy_loss falls back to (clamped to at least 1).

    Args:
        mask: [S, T] completion mask; nonzero marks a token that counts.
        agg: one of AGG_MODES.

    Returns:
        {"global_tokens": unmasked token count} for "token-mean", otherwise
        {"global_sequences": number of sequences with at least one unmasked token}; int64 0-dim.
    """
    check_choice("agg", agg, AGG_MODES)
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(f"mask must be a 2-D tensor [S, T], got {describe(mask)}")
    valid_ST = mask != 0
    if agg == "token-mean":
        return {"global_tokens": valid_ST.sum()}
    return {"global_sequences": valid_ST.any(dim=-1).sum()}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_sequences: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (to minimise) of one micro-batch, with optional KL penalty and TIS.

    ``spec`` (a validated :class:`~r1mega.algo.loss_spec.LossSpec`) names the options below.
    Per token (A the advantage, sg the stop-gradient):
      ratio r = exp(clamp(logp - old_logp, -20, 20)) for ratio_level="token". For "sequence"
        (GSPO) the log-ratio is logp - sg(logp) + sg(s), s = the sequence's masked mean of
        logp - old_logp: its value is s, its gradient that of logp; clamped to [-20, 20] too
        (verl also caps it at 10 from above: identical while |s| < 10).
      pg = max(-A*r, -A*clamp(r, 1 - eps_low, 1 + eps_high)); with dual_clip=c, tokens with A < 0
        take min(pg, -A*c) (dual-clip PPO as in verl); tokens with A >= 0 are unchanged.
      w = min(exp(clamp(old_logp - rollout_logp, -20, 20)), tis_cap), detached, when rollout_logp
        is given (truncated importance sampling for the rollout/trainer mismatch); else w = 1.
      kl, with d = ref_logp - logp: "k1" = -d, "k2" = d^2/2, "k3" = exp(d) - d - 1. The "+"
        variants ("k1+", "k3+") have the value of k1 / k3 and the gradient of k2. kl_clamp=None
        clamps nothing (TRL). kl_clamp=c: for k3 d is first clamped to [-20, 20]; the value of
        every estimator is then clamped to [-c, c] (k3 with c=10 is verl's low_var_kl).
      L = w*pg + kl_coef*kl.
    Adding kl_coef*kl per token (TRL) equals adding kl_coef * aggregate(kl) after aggregation
    (verl): every aggregation is linear in L.

    Aggregation of L over the mask M (n_s = unmasked tokens of sequence s):
      "token-mean":              sum(L*M) / global_tokens
      "seq-mean-token-mean":     sum_s(sum_t(L*M) / max(n_s, 1)) / global_sequences
      "seq-mean-token-sum":      sum(L*M) / global_sequences
      "seq-mean-token-sum-norm": sum(L*M) / (global_sequences * norm_length)
    Defaults: global_tokens = max(sum(M), 1); global_sequences = max(number of sequences with
    n_s > 0, 1); norm_length = T. global_tokens and global_sequences must be > 0 and may only be
    passed to the aggregations that use them (ValueError otherwise), so a denominator is never
    silently ignored. See the module docstring for the verl / TRL mapping.

    Args:
        logp: [S, T] log-probs of the sampled tokens under the policy being trained (the only
            input gradients flow to).
        old_logp: [S, T] log-probs under the policy that is the PPO anchor (sampling policy).
        advantages: [S] per-sequence or [S, T] per-token advantages.
        mask: [S, T] bool or 0/1 completion mask; nonzero marks a token that counts. Values of
            the other inputs at masked positions are ignored (they may be NaN or inf) and get
            zero gradient; fully masked sequences contribute nothing.
        spec: the loss options (eps_low, eps_high, dual_clip, ratio_level, kl_coef, kl_estimator,
            kl_clamp, tis_cap, agg, norm_length); spec.kl_coef != 0 needs ref_logp and
            spec.tis_cap needs rollout_logp.
        ref_logp: [S, T] reference-model log-probs; enables the KL term and the "kl_mean" metric.
        rollout_logp: [S, T] log-probs reported by the rollout engine; enables TIS.
        global_tokens, global_sequences: mini-batch denominators, Python numbers or one-element
            tensors (e.g. all-reduced sums of :func:`local_denominators`).

    Returns:
        (loss, metrics). loss: 0-dim tensor, float32 (float64 when an input is float64; bf16 and
        fp16 inputs are upcast). metrics: detached 0-dim tensors, means over this micro-batch's
        unmasked tokens (0 when there are none): "clip_frac_low" (r < 1 - eps_low and A < 0),
        "clip_frac_high" (r > 1 + eps_high and A > 0), "dual_clip_frac" (A < 0 and the dual
        bound -A*c is the loss), "ratio_mean", "ratio_max", "approx_kl" (k3 of old vs new:
        d = old_logp - logp), "kl_mean" (the KL estimator's value; only with ref_logp),
        "tis_weight_mean" (only with rollout_logp), and "tokens" (unmasked token count) to
        weight the means when combining micro-batches.
    """
    check_floating("logp", logp, ndim=2)
    shape_ST = logp.shape
    check_shape("old_logp", old_logp, shape_ST, like="logp", floating=True)
    for name, tensor in (("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if tensor is not None:
            check_shape(name, tensor, shape_ST, like="logp", floating=True)
    check_shape("mask", mask, shape_ST, like="logp")
    check_floating("advantages", advantages)
    if advantages.shape not in (shape_ST[:1], shape_ST):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)} but must be [S] {tuple(shape_ST[:1])} "
            f"or [S, T] {tuple(shape_ST)} like logp"
        )
    spec.check_inputs(has_ref=ref_logp is not None, has_rollout=rollout_logp is not None)
    denominators = spec.denominators(global_tokens, global_sequences)
    eps_low, eps_high, dual_clip = spec.eps_low, spec.eps_high, spec.dual_clip

    inputs = (logp, old_logp, advantages, ref_logp, rollout_logp)
    dtype = reduce(torch.promote_types, (t.dtype for t in inputs if t is not None), torch.float32)
    valid_ST = mask != 0
    mask_ST = valid_ST.to(dtype)

    def masked(x: torch.Tensor) -> torch.Tensor:
        # Zero at masked positions so padding garbage (NaN, inf) cannot reach loss or gradient.
        return torch.where(valid_ST, x.to(dtype), 0.0)

    logp_ST = masked(logp)
    old_ST = masked(old_logp.detach())
    adv_ST = masked(advantages.detach() if advantages.dim() == 2 else advantages.detach()[:, None])
    log_ratio_ST = logp_ST - old_ST
    if spec.ratio_level == "token":
        is_log_ratio_ST = log_ratio_ST
    else:
        seq_log_ratio_S = (log_ratio_ST * mask_ST).sum(-1) / mask_ST.sum(-1).clamp(min=1)
        is_log_ratio_ST = logp_ST - logp_ST.detach() + seq_log_ratio_S.detach()[:, None]
    ratio_ST = torch.exp(is_log_ratio_ST.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))

    pg_ST = torch.maximum(-adv_ST * ratio_ST, -adv_ST * ratio_ST.clamp(1.0 - eps_low, 1.0 + eps_high))
    dual_active_ST = torch.zeros_like(valid_ST)
    if dual_clip is not None:
        dual_bound_ST = -adv_ST * dual_clip
        dual_active_ST = (adv_ST < 0) & (pg_ST > dual_bound_ST)
        pg_ST = torch.where(adv_ST < 0, torch.minimum(pg_ST, dual_bound_ST), pg_ST)

    optional_metrics_ST: dict[str, torch.Tensor] = {}
    loss_ST = pg_ST
    if rollout_logp is not None:
        tis_log_w_ST = (old_ST - masked(rollout_logp.detach())).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        tis_w_ST = torch.exp(tis_log_w_ST)
        if spec.tis_cap is not None:
            tis_w_ST = tis_w_ST.clamp(max=spec.tis_cap)
        loss_ST = tis_w_ST * pg_ST
        optional_metrics_ST["tis_weight_mean"] = tis_w_ST
    if ref_logp is not None:
        kl_ST = _kl_penalty(logp_ST, masked(ref_logp.detach()), spec.kl_estimator, spec.kl_clamp)
        if spec.kl_coef != 0.0:
            loss_ST = loss_ST + spec.kl_coef * kl_ST
        optional_metrics_ST["kl_mean"] = kl_ST.detach()

    loss = aggregate(loss_ST, valid_ST, mask_ST, spec.agg, **denominators)
    metrics = loss_metrics(
        valid_ST, mask_ST, log_ratio_ST, ratio_ST,
        clip_low_ST=(ratio_ST < 1.0 - eps_low) & (adv_ST < 0),
        clip_high_ST=(ratio_ST > 1.0 + eps_high) & (adv_ST > 0),
        dual_clip_ST=dual_active_ST, optional_ST=optional_metrics_ST,
    )
    return loss, metrics


def loss_metrics(
    valid_ST: torch.Tensor, mask_ST: torch.Tensor, log_ratio_ST: torch.Tensor, ratio_ST: torch.Tensor, *,
    clip_low_ST: torch.Tensor, clip_high_ST: torch.Tensor, dual_clip_ST: torch.Tensor,
    optional_ST: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """policy_loss's metrics from its per-token quantities: detached means over unmasked tokens.

    log_ratio_ST is logp - old_logp (0 at masked tokens); the clip tensors are booleans; every
    tensor of optional_ST (e.g. "kl_mean", "tis_weight_mean") is averaged under its own name.
    Shared with r1mega.ops' fused loss so both report identical metrics.
    """
    with torch.no_grad():
        tokens = mask_ST.sum()

        def token_mean(x_ST: torch.Tensor) -> torch.Tensor:
            return (x_ST * mask_ST).sum() / tokens.clamp(min=1)

        # k3 of the sampling policy vs the current one, from the (clamped) token log-ratio.
        old_minus_new_ST = -log_ratio_ST.detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ratio_ST = ratio_ST.detach()
        return {
            "clip_frac_low": token_mean(clip_low_ST),
            "clip_frac_high": token_mean(clip_high_ST),
            "dual_clip_frac": token_mean(dual_clip_ST),
            "ratio_mean": token_mean(ratio_ST),
            # Ratios are positive, so padding with 0 gives the masked max, and 0 when all masked.
            "ratio_max": F.pad(torch.where(valid_ST, ratio_ST, 0.0).flatten(), (0, 1)).max(),
            "approx_kl": token_mean(torch.expm1(old_minus_new_ST) - old_minus_new_ST),
            **{name: token_mean(value_ST.detach()) for name, value_ST in optional_ST.items()},
            "tokens": tokens,
        }


def _kl_penalty(
    logp_ST: torch.Tensor, ref_ST: torch.Tensor, estimator: str, clamp: float | None
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate; see policy_loss for the definitions."""
    d_ST = ref_ST - logp_ST
    base = estimator.rstrip("+")
    if base == "k1":
        value_ST = -d_ST
    elif base == "k2":
        value_ST = 0.5 * d_ST.square()
    else:
        clamped_ST = d_ST if clamp is None else d_ST.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        # expm1(d) - d is exp(d) - d - 1 without the cancellation of 1 - 1 for small d.
        value_ST = torch.expm1(clamped_ST) - clamped_ST
    if clamp is not None:
        value_ST = value_ST.clamp(-clamp, clamp)
    if estimator.endswith("+"):
        # Straight-through: the estimator's value, k2's (unbiased-gradient) derivative.
        k2_ST = 0.5 * d_ST.square()
        value_ST = k2_ST - k2_ST.detach() + value_ST.detach()
    return value_ST


def aggregate(
    loss_ST: torch.Tensor,
    valid_ST: torch.Tensor,
    mask_ST: torch.Tensor,
    agg: str,
    global_tokens: float | None = None,
    global_sequences: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce the per-token loss to a scalar; see policy_loss for the formulas."""
    ((name, local_count),) = local_denominators(valid_ST, agg).items()
    given = global_tokens if name == "global_tokens" else global_sequences
    denominator = local_count.clamp(min=1) if given is None else given
    summed_S = (loss_ST * mask_ST).sum(-1)
    if agg == "seq-mean-token-mean":
        summed_S = summed_S / mask_ST.sum(-1).clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        summed_S = summed_S / (loss_ST.shape[-1] if norm_length is None else norm_length)
    return summed_S.sum() / denominator
