"""GRPO loss from logits, fused: r1mega.algo.policy_loss of the sampled tokens' log-probs.

``grpo_loss(logits, tokens, ...)`` equals ``policy_loss(token_logprobs(logits, tokens), ...)`` (the
reference, :func:`reference_grpo_loss`) in value, gradient and metrics, for every option, without
materialising anything of size [S, T, V] besides the logits and their gradient.

Alignment: ``logits[s, t]`` predicts ``tokens[s, t]``, the completion token at position t; for a
causal LM over prompt + completion, pass the logits shifted by one (see r1mega.ops.logprob).

Backends (``backend=None``: "triton" where it can run, else "torch"):
  "triton": one Triton pass over the logits of the unmasked tokens computes the log-prob and, as
      its epilogue, the per-token loss L_t, dL_t/dlogp_t, ratio, KL, TIS weight and clip flags
      (r1mega_kernels.grpo_loss). GSPO's ratio needs the sequence mean of the log-probs first, so
      there the epilogue runs as a second elementwise [N] kernel. Aggregation is
      r1mega.algo.policy_loss's own ``aggregate`` on the [S, T] per-token losses, so the
      aggregation weights w_t (1 / global_tokens, 1 / (n_s global_sequences), ...) and the global
      denominators are exactly the reference's; the backward gets grad L_t = w_t and makes one
      pass over the logits: d logits = w_t dL_t (onehot - softmax) / temperature. Saved for
      backward: the logits (by reference), and per token the row max, log-sum and dL_t/dlogp_t.
  "torch": policy_loss applied to the chunked torch log-probs of r1mega.ops.logprob.
``inplace_backward=True`` writes d(loss)/d(logits) into the logits buffer (see r1mega.ops.logprob).
"""

from __future__ import annotations

from functools import reduce

import torch

from r1mega.algo import policy_loss
from r1mega.algo import token_logprobs as _algo_token_logprobs
from r1mega.algo.checks import check_floating, check_shape
from r1mega.algo.loss_spec import LossSpec
from r1mega.algo.clipped_loss import LOG_RATIO_BOUND, aggregate, loss_metrics
from r1mega.ops.backend import resolve_backend
from r1mega.ops.logprob import as_rows, logits_grad, logprob_fwd, token_logprobs

# The bits of the kernels' clip_flags (r1mega_kernels.grpo_loss, not imported here: importing a
# kernel module must wait until TRITON_INTERPRET is settled).
_FLAG_CLIP_LOW, _FLAG_CLIP_HIGH, _FLAG_DUAL_CLIP = 1, 2, 4


def reference_grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    temperature: float = 1.0,
    **tensors,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The one torch reference: policy_loss on r1mega.algo.token_logprobs of the full logits
    (`tensors`: policy_loss's ref_logp, rollout_logp and global denominators)."""
    logp = _algo_token_logprobs(logits, tokens, temperature=temperature)
    return policy_loss(logp, old_logp, advantages, mask, spec, **tensors)


# ---------------------------------------------------------------------------------------------
# Custom ops over the Triton kernels.
# ---------------------------------------------------------------------------------------------

def _or_empty(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.float32) if x is None else x


@torch.library.custom_op("r1mega::grpo_fwd", mutates_args=())
def _grpo_fwd(
    logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, ref_logp: torch.Tensor | None, rollout_logp: torch.Tensor | None,
    temperature: float, eps_low: float, eps_high: float, dual_clip: float | None, kl_estimator: str,
    kl_coef: float, kl_clamp: float | None, tis_cap: float | None, log_ratio_bound: float,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Token-level terms: (loss, dloss, ratio, kl, tis_weight, clip_flags, logp, row_max, row_logsum)."""
    from r1mega_kernels.grpo_loss import grpo_forward

    out = grpo_forward(
        logits, tokens, valid, old_logp, advantages, ref_logp=ref_logp, rollout_logp=rollout_logp,
        temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        kl_estimator=kl_estimator, kl_coef=kl_coef, kl_clamp=kl_clamp, tis_cap=tis_cap,
        log_ratio_bound=log_ratio_bound,
    )
    return (out.loss, out.dloss, out.ratio, _or_empty(out.kl, tokens), _or_empty(out.tis_weight, tokens),
            out.clip_flags, out.logp, out.row_max, out.row_logsum)


def _fake_terms(like: torch.Tensor, has_ref: bool, has_rollout: bool) -> list[torch.Tensor]:
    def new(present=True, dtype=torch.float32):
        return like.new_empty(like.shape if present else (0,), dtype=dtype)

    return [new(), new(), new(), new(has_ref), new(has_rollout), new(dtype=torch.int8)]


@_grpo_fwd.register_fake
def _(logits, tokens, valid, old_logp, advantages, ref_logp, rollout_logp, *args):
    terms = _fake_terms(tokens, ref_logp is not None, rollout_logp is not None)
    return (*terms, *(tokens.new_empty(tokens.shape, dtype=torch.float32) for _ in range(3)))


def _grpo_fwd_setup(ctx, inputs, output):
    logits, tokens, valid, *_, temperature = inputs[:8]
    inplace_backward = inputs[-1]
    dloss, row_max, row_logsum = output[1], output[7], output[8]
    ctx.save_for_backward(logits, tokens, valid, dloss, row_max, row_logsum)
    ctx.options = (temperature, inplace_backward)
    ctx.set_materialize_grads(False)


def _grpo_fwd_backward(ctx, grad_loss, _dloss, _ratio, _kl, _tis, _flags, grad_logp, _row_max, _row_logsum):
    logits, tokens, valid, dloss, row_max, row_logsum = ctx.saved_tensors
    temperature, inplace = ctx.options
    if not ctx.needs_input_grad[0] or (grad_loss is None and grad_logp is None):
        return (None,) * 17
    # d(loss)/d(logp_t): the aggregation weight (grad_loss) times dL_t/dlogp_t, plus any gradient
    # that reached the logp output directly. Masked tokens (logp fixed at 0 there) get none.
    grad = torch.zeros_like(dloss) if grad_loss is None else grad_loss * dloss
    if grad_logp is not None:
        grad = grad + grad_logp
    grad = torch.where(valid != 0, grad, 0.0)
    dlogits = logits_grad(logits, tokens, row_max, row_logsum, grad, None, None, temperature, "triton", inplace)
    return (dlogits,) + (None,) * 16


torch.library.register_autograd("r1mega::grpo_fwd", _grpo_fwd_backward, setup_context=_grpo_fwd_setup)


@torch.library.custom_op("r1mega::grpo_terms", mutates_args=())
def _grpo_terms(
    logp: torch.Tensor, valid: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
    seq_log_ratio: torch.Tensor | None, ref_logp: torch.Tensor | None, rollout_logp: torch.Tensor | None,
    eps_low: float, eps_high: float, dual_clip: float | None, kl_estimator: str, kl_coef: float,
    kl_clamp: float | None, tis_cap: float | None, log_ratio_bound: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise terms from log-probs: (loss, dloss, ratio, kl, tis_weight, clip_flags)."""
    from r1mega_kernels.grpo_loss import grpo_token_terms

    out = grpo_token_terms(
        logp, valid, old_logp, advantages, seq_log_ratio=seq_log_ratio, ref_logp=ref_logp,
        rollout_logp=rollout_logp, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
        kl_estimator=kl_estimator, kl_coef=kl_coef, kl_clamp=kl_clamp, tis_cap=tis_cap,
        log_ratio_bound=log_ratio_bound,
    )
    return (out.loss, out.dloss, out.ratio, _or_empty(out.kl, logp), _or_empty(out.tis_weight, logp),
            out.clip_flags)


@_grpo_terms.register_fake
def _(logp, valid, old_logp, advantages, seq_log_ratio, ref_logp, rollout_logp, *args):
    return tuple(_fake_terms(logp, ref_logp is not None, rollout_logp is not None))


def _grpo_terms_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.set_materialize_grads(False)


def _grpo_terms_backward(ctx, grad_loss, *_unused):
    (dloss,) = ctx.saved_tensors
    grad_logp = None if grad_loss is None or not ctx.needs_input_grad[0] else grad_loss * dloss
    return (grad_logp,) + (None,) * 14


torch.library.register_autograd("r1mega::grpo_terms", _grpo_terms_backward, setup_context=_grpo_terms_setup)


# ---------------------------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------------------------


def grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_sequences: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy_loss(token_logprobs(logits, tokens, temperature=temperature), old_logp, ...), fused.

    Args:
        logits: [S, T, V] float logits (bf16, fp16, fp32; fp64 runs on the torch backend);
            logits[s, t] predicts tokens[s, t]. Leading strides are free (a slice of the model
            output is read in place); the vocabulary dimension must be contiguous for "triton".
        tokens: [S, T] integer ids of the sampled tokens. Ids at masked positions are never used
            (padding such as -100 is fine); an unmasked id outside [0, V) has log-prob -inf.
        old_logp, advantages, mask, spec, ref_logp, rollout_logp, global_tokens,
            global_sequences: exactly as in r1mega.algo.policy_loss (same checks, aggregation and
            global denominators, so gradient accumulation and data parallelism stay exact).
        temperature: > 0, the sampling temperature (logits are divided by it inside).
        backend: None (auto), "triton" or "torch".
        inplace_backward: write d(loss)/d(logits) into the logits buffer.

    Returns:
        (loss, metrics) as policy_loss returns them: loss float32 (float64 when an input is
        float64), metrics detached 0-dim tensors with the same keys.
    """
    check_floating("logits", logits, ndim=3)
    logits3, tokens2 = as_rows(logits, tokens, temperature)
    shape_ST = tokens2.shape
    for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if tensor is not None or name == "old_logp":
            check_shape(name, tensor, shape_ST, like="tokens", floating=True)
    check_shape("mask", mask, shape_ST, like="tokens")
    if not (isinstance(advantages, torch.Tensor) and advantages.is_floating_point()):
        raise ValueError(f"advantages must be a floating tensor, got {advantages!r}")
    if advantages.shape not in (shape_ST[:1], shape_ST):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)} but must be [S] {tuple(shape_ST[:1])} "
            f"or [S, T] {tuple(shape_ST)} like tokens"
        )
    spec.check_inputs(has_ref=ref_logp is not None, has_rollout=rollout_logp is not None)
    denominators = spec.denominators(global_tokens, global_sequences)
    backend = resolve_backend(backend, logits)
    valid_ST = mask != 0

    if backend == "torch":
        safe_tokens = torch.where(valid_ST, tokens2, 0)  # padding ids (e.g. -100) are never looked up
        logp = token_logprobs(logits3, safe_tokens, temperature=temperature, backend="torch",
                              inplace_backward=inplace_backward)
        return policy_loss(logp, old_logp, advantages, mask, spec, ref_logp=ref_logp, rollout_logp=rollout_logp,
                           global_tokens=global_tokens, global_sequences=global_sequences)

    inputs = (old_logp, advantages, ref_logp, rollout_logp)
    dtype = reduce(torch.promote_types, (t.dtype for t in inputs if t is not None), torch.float32)
    mask_ST = valid_ST.to(dtype)
    adv_ST = advantages.detach()
    adv_ST = (adv_ST if adv_ST.dim() == 2 else adv_ST[:, None].expand(shape_ST)).contiguous()
    old_ST = old_logp.detach().contiguous()
    ref_ST, rollout_ST = (None if x is None else x.detach().contiguous() for x in (ref_logp, rollout_logp))
    loss_options = (spec.eps_low, spec.eps_high, spec.dual_clip, spec.kl_estimator, spec.kl_coef, spec.kl_clamp,
                    spec.tis_cap, LOG_RATIO_BOUND)
    valid_u8 = valid_ST.contiguous().view(torch.uint8)  # bytes, not i1 pointers, for the kernels
    if spec.ratio_level == "token":
        loss_ST, _, ratio_ST, kl_ST, tis_ST, flags_ST, logp_ST, _, _ = _grpo_fwd(
            logits3, tokens2, valid_u8, old_ST, adv_ST, ref_ST, rollout_ST, float(temperature), *loss_options,
            bool(inplace_backward),
        )
    else:
        logp_ST = logprob_fwd(logits3, tokens2, valid_u8, float(temperature), False, "triton",
                               bool(inplace_backward))[0]
        # The sequence log-ratio exactly as policy_loss computes it (detached: GSPO's factor).
        with torch.no_grad():
            log_ratio_ST = _masked_log_ratio(valid_ST, logp_ST, old_ST, dtype)
            seq_S = (log_ratio_ST * mask_ST).sum(-1) / mask_ST.sum(-1).clamp(min=1)
            seq_ST = seq_S[:, None].expand(shape_ST).contiguous()
        loss_ST, _, ratio_ST, kl_ST, tis_ST, flags_ST = _grpo_terms(
            logp_ST, valid_u8, old_ST, adv_ST, seq_ST, ref_ST, rollout_ST, *loss_options
        )
    loss = aggregate(loss_ST.to(dtype), valid_ST, mask_ST, spec.agg, **denominators)
    optional_ST = {}
    if tis_ST is not None and rollout_logp is not None:
        optional_ST["tis_weight_mean"] = tis_ST.to(dtype)
    if kl_ST is not None and ref_logp is not None:
        optional_ST["kl_mean"] = kl_ST.to(dtype)
    metrics = loss_metrics(
        valid_ST, mask_ST, _masked_log_ratio(valid_ST, logp_ST, old_ST, dtype), ratio_ST.to(dtype),
        clip_low_ST=(flags_ST & _FLAG_CLIP_LOW) != 0, clip_high_ST=(flags_ST & _FLAG_CLIP_HIGH) != 0,
        dual_clip_ST=(flags_ST & _FLAG_DUAL_CLIP) != 0, optional_ST=optional_ST,
    )
    return loss, metrics


def _masked_log_ratio(valid_ST, logp_ST, old_ST, dtype) -> torch.Tensor:
    """logp - old_logp in ``dtype`` with 0 at masked tokens, as policy_loss forms it."""
    return torch.where(valid_ST, logp_ST.detach().to(dtype), 0.0) - torch.where(valid_ST, old_ST.to(dtype), 0.0)
