"""The GRPO loss from hidden states and the output-layer weight, without ever holding full logits.

``linear_grpo_loss(hidden, weight, ...)`` equals ``grpo_loss(hidden @ weight.T, ...)`` (the
reference: r1mega.ops.reference_grpo_loss of those logits) in loss, metrics and the gradients of
hidden and weight, but the [N, V] logits exist only one chunk of tokens at a time, in forward
and backward: peak memory O(chunk_tokens x V) instead of O(N x V).

Algorithm (Liger-Kernel's fused-linear pattern; everything happens in the forward):
  * Only the unmasked tokens are processed (their positions are gathered once), in chunks of
    ``chunk_tokens``. The aggregation weight of every token, w_t = d loss / d L_t, is known before
    any logit exists: it depends on the mask and the denominators only (it is taken from
    r1mega.algo.policy_loss's own ``aggregate`` by autograd, so it is exactly the reference's).
  * Per chunk: logits_c = hidden_c @ W.T (input dtype, float32 accumulation in the GEMM); one pass
    over logits_c for the log-prob AND the per-token loss derivative dL_t/dlogp_t (backend
    "triton": the fused kernel r1mega_kernels.grpo_loss.grpo_forward; "torch": the chunked torch
    log-probs and autograd of policy_loss on the chunk's tokens); then one more pass writes
    d logits_c = w_t dL_t/dlogp_t (onehot - softmax) / temperature over logits_c IN PLACE, and
        grad_hidden_c  = d logits_c @ W            (written once: each token is in one chunk)
        grad_W        += d logits_c.T @ hidden_c   (accumulated in float32 for bf16/fp16 weights)
  * The loss and metrics are r1mega.algo.policy_loss of the collected [S, T] log-probs, so every
    option, global denominator and metric is the reference's.
  * The backward only scales the stored gradients by the incoming gradient (and refuses to run
    twice: the stored gradients are scaled in place and freed).

GSPO (ratio_level="sequence") takes two passes: the sequence ratio needs the mean log-prob of each
whole sequence before any token's derivative is known. Pass 1 computes the log-probs (and the
per-token max and log-sum-exp) chunk by chunk without gradients; policy_loss on them gives the
loss, the metrics and d loss / d logp by autograd; pass 2 recomputes each chunk's logits and does
the backward part above. It costs one more logits GEMM (four instead of three).

Tensor parallelism (``group``): ``weight`` is this rank's vocabulary shard [V/tp, H] (megatron's
column-parallel output layer, ids [r V/tp, (r+1) V/tp)); each chunk's log-probs are all-reduced
as in r1mega.ops.vocab_parallel (two all-reduces of chunk-sized per-token vectors per chunk,
never [N, V]); grad_W is this shard's slice. ``hidden`` must be the same on every rank of the
group; its gradient is each rank's partial d logits_shard @ W_shard summed with one all-reduce of
[N, H] (what megatron's column-parallel layer does in its backward). With sequence parallelism
pass ``hidden_grad_all_reduce=False`` and let the backward of the all-gather that produced
``hidden`` reduce-scatter the partial gradients. Every rank of the group calls with the same
hidden states, tokens, mask, per-token inputs and options (only the weight shard differs), so
that all ranks run the same chunks and collectives.

Memory: the chunk's logits (input dtype; the Triton backend writes their gradient in place, the
torch backend adds at most r1mega.ops.logprob.CHUNK_ELEMENTS float32 temporaries), plus the
outputs: grad_hidden [S, T, H] and grad_W [V, H] (with a float32 accumulator of V x H while it is
summed, for bf16/fp16 weights). No bias (LM heads have none). Not torch.compile-safe (Python chunk
loop and collectives): the function is wrapped in ``torch.compiler.disable``.
"""

from __future__ import annotations

from functools import reduce
from typing import NamedTuple

import torch
import torch.distributed as dist

from r1mega.algo import policy_loss
from r1mega.algo.checks import check_floating, check_integer, describe, positive
from r1mega.algo.loss_spec import LossSpec
from r1mega.algo.clipped_loss import LOG_RATIO_BOUND, aggregate
from r1mega.ops.backend import resolve_backend
from r1mega.ops.logprob import logits_grad
from r1mega.ops.vocab_parallel import VocabShard, check_token_inputs, sharded_logprob_stats, vocab_shard

# Default logits per chunk (chunk_tokens = CHUNK_LOGIT_BYTES // (V_shard * element size)): on a
# GPU 512 MiB, large enough that the chunk GEMMs run at full speed (1.7k tokens at V = 152k bf16);
# on a CPU 32 MiB.
CHUNK_LOGIT_BYTES = {"cuda": 1 << 29, "cpu": 1 << 25}
LOW_PRECISION = (torch.bfloat16, torch.float16)
# matmul with a float32 result from bf16/fp16 operands without upcasting them: CUDA only, torch >= 2.8
# (aten::mm.dtype, aten::addmm.dtype_out). Switched off for the process if the first use fails.
_mm_out_dtype = {"ok": hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")}


def default_chunk_tokens(vocab_shard_width: int, dtype: torch.dtype, device: torch.device) -> int:
    budget = CHUNK_LOGIT_BYTES.get(device.type, CHUNK_LOGIT_BYTES["cpu"])
    return max(1, budget // (vocab_shard_width * torch.empty(0, dtype=dtype).element_size()))


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result (float32 accumulation, one rounding)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_out_dtype["ok"]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _mm_out_dtype["ok"] = False
    return a.float() @ b.float()


def _addmm_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 ``acc`` and operands of any float dtype, one rounding per call."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _mm_out_dtype["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # cuBLAS: C = A B + C, C float32
            return
        except (RuntimeError, TypeError):
            _mm_out_dtype["ok"] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # upcasts one chunk (and the [c, H] rows), not W


class _LinearGrpoGrads(torch.autograd.Function):
    """Attach gradients computed in the forward to (hidden, weight); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: the stored gradients are not needed again (a second backward through the same
        # graph then fails on the version check instead of returning scaled-twice gradients).
        grad_hidden, grad_weight = ctx.saved_tensors
        grads = [None if g is None else g.mul_(grad_loss) for g in (grad_hidden, grad_weight)]
        return grads[0], grads[1], None, None, None


class _Inputs(NamedTuple):
    """The per-token inputs at the unmasked positions, flattened to [Nv] (row-major order)."""

    s_idx: torch.Tensor
    t_idx: torch.Tensor
    tokens: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    ref: torch.Tensor | None
    rollout: torch.Tensor | None
    weight: torch.Tensor | None  # aggregation weights w_t (token level only)


def _aggregation_weights(valid_ST: torch.Tensor, agg: str, denominators: dict, dtype: torch.dtype) -> torch.Tensor:
    """w_t = d aggregate(L) / d L_t: aggregate is linear in L, so its gradient at 0 is the weights."""
    with torch.enable_grad():
        x = torch.zeros(valid_ST.shape, dtype=dtype, device=valid_ST.device, requires_grad=True)
        total = aggregate(x, valid_ST, valid_ST.to(dtype), agg, **denominators)
        (weights,) = torch.autograd.grad(total, x)
    return weights


def _token_dloss_torch(logp, inputs: _Inputs, sl: slice, spec: LossSpec) -> torch.Tensor:
    """dL_t/dlogp_t of the chunk's tokens by autograd of policy_loss (token-level ratio).

    With agg="token-mean" and global_tokens=1 the loss is sum_t L_t, whose gradient is dL_t/dlogp_t.
    """
    def row(x):
        return None if x is None else x[sl][None]

    with torch.enable_grad():
        x = logp.detach()[None].requires_grad_()
        loss, _ = policy_loss(x, row(inputs.old), row(inputs.adv), torch.ones_like(x, dtype=torch.bool),
                              spec.replace(agg="token-mean", norm_length=None), ref_logp=row(inputs.ref),
                              rollout_logp=row(inputs.rollout), global_tokens=1.0)
        (dloss,) = torch.autograd.grad(loss, x)
    return dloss[0]


class _Result(NamedTuple):
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None


def _forward(hidden, weight, tokens, old_logp, advantages, mask, ref_logp, rollout_logp, *, spec: LossSpec,
             denominators, temperature, chunk, backend, shard: VocabShard | None, hidden_grad_all_reduce,
             need_grad_h: bool, need_grad_w: bool) -> _Result:
    S, T, _ = hidden.shape
    valid_ST = mask != 0
    logp_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 hidden: float64 log-probs
    # policy_loss's compute dtype (that of its logp and per-token inputs): the aggregation weights'.
    dtype = reduce(torch.promote_types, (t.dtype for t in (old_logp, advantages, ref_logp, rollout_logp)
                                         if t is not None), logp_dtype)
    token_level = spec.ratio_level == "token"
    need_grads = need_grad_h or need_grad_w

    s_idx, t_idx = valid_ST.nonzero(as_tuple=True)
    n_valid = s_idx.numel()
    adv_ST = advantages.detach()
    inputs = _Inputs(
        s_idx, t_idx, tokens[s_idx, t_idx].long(),
        old_logp.detach()[s_idx, t_idx].contiguous(),
        (adv_ST[s_idx] if adv_ST.dim() == 1 else adv_ST[s_idx, t_idx]).contiguous(),
        None if ref_logp is None else ref_logp.detach()[s_idx, t_idx].contiguous(),
        None if rollout_logp is None else rollout_logp.detach()[s_idx, t_idx].contiguous(),
        _aggregation_weights(valid_ST, spec.agg, denominators, dtype)[s_idx, t_idx].contiguous()
        if token_level and need_grads else None,
    )
    kernel_options = dict(spec.token_terms(), log_ratio_bound=LOG_RATIO_BOUND)
    ones_u8 = torch.ones(min(chunk, n_valid), dtype=torch.uint8, device=hidden.device)

    logp_v = torch.zeros(n_valid, dtype=logp_dtype, device=hidden.device)
    # Pass 2 of the two-pass path re-uses the forward's per-token max and log-sum-exp.
    saved_stats = None if token_level or not need_grads else (torch.empty_like(logp_v), torch.empty_like(logp_v))
    grad_hidden = grad_weight = None
    if need_grad_h:  # float32 when rank partials are summed, so that only the final cast rounds
        grad_dtype = torch.float32 if shard is not None and hidden.dtype in LOW_PRECISION else hidden.dtype
        grad_hidden = torch.zeros(hidden.shape, dtype=grad_dtype, device=hidden.device)
    if need_grad_w:
        acc_dtype = torch.float32 if weight.dtype in LOW_PRECISION else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)

    upcast: dict[str, torch.Tensor] = {}

    def chunk_logits(sl):
        h = hidden.detach()[s_idx[sl], t_idx[sl]]  # [c, H] gathered rows (any strides)
        return h, (h @ weight.detach().T)[None]  # [1, c, V_shard]

    def backprop(sl, h, logits, local_tokens, row_max, row_logsum, grad_logp):
        """d logits in place over the chunk's logits, then the two GEMMs."""
        dlogits = logits_grad(logits, local_tokens, row_max, row_logsum, grad_logp[None], None, None,
                              temperature, backend, True)[0]
        if grad_hidden is not None:
            w = weight.detach()
            if grad_hidden.dtype == w.dtype:
                gh = dlogits @ w
            elif w.is_cuda and _mm_out_dtype["ok"]:
                gh = _mm_float32(dlogits, w)
            else:  # float32 partials without torch.mm(out_dtype=): upcast W once, not per chunk
                if "weight" not in upcast:
                    upcast["weight"] = w.float()
                gh = dlogits.float() @ upcast["weight"]
            grad_hidden[s_idx[sl], t_idx[sl]] = gh
        if grad_weight is not None:
            _addmm_float32_(grad_weight, dlogits.T, h)

    for i0 in range(0, n_valid, chunk):
        sl = slice(i0, min(i0 + chunk, n_valid))
        h, logits = chunk_logits(sl)
        tokens_c = inputs.tokens[sl][None]
        c = tokens_c.shape[1]
        if token_level and backend == "triton" and shard is None:
            # One fused pass: log-prob, per-token loss terms and dL/dlogp.
            from r1mega_kernels.grpo_loss import grpo_forward

            out = grpo_forward(logits, tokens_c, ones_u8[:c][None], inputs.old[sl][None], inputs.adv[sl][None],
                               ref_logp=None if inputs.ref is None else inputs.ref[sl][None],
                               rollout_logp=None if inputs.rollout is None else inputs.rollout[sl][None],
                               temperature=temperature, **kernel_options)
            logp_c, row_max, row_logsum, local_tokens, dloss = out.logp[0], out.row_max, out.row_logsum, tokens_c, \
                out.dloss[0]
        else:
            stats = sharded_logprob_stats(logits, tokens_c, None, temperature, False, backend, shard)
            logp_c, row_max, row_logsum, local_tokens = stats.logp[0], stats.row_max, stats.row_logsum, \
                stats.local_tokens
            dloss = None
            if token_level and need_grads:
                if backend == "triton":
                    from r1mega_kernels.grpo_loss import grpo_token_terms

                    dloss = grpo_token_terms(logp_c, ones_u8[:c], inputs.old[sl], inputs.adv[sl],
                                             ref_logp=None if inputs.ref is None else inputs.ref[sl],
                                             rollout_logp=None if inputs.rollout is None else inputs.rollout[sl],
                                             **kernel_options).dloss
                else:
                    dloss = _token_dloss_torch(logp_c, inputs, sl, spec)
        logp_v[sl] = logp_c
        if token_level and need_grads:
            backprop(sl, h, logits, local_tokens, row_max, row_logsum, inputs.weight[sl] * dloss)
        elif saved_stats is not None:
            saved_stats[0][sl], saved_stats[1][sl] = row_max[0], row_logsum[0]
        del h, logits

    logp_ST = torch.zeros(S, T, dtype=logp_dtype, device=hidden.device)
    logp_ST[s_idx, t_idx] = logp_v
    denominator_kwargs = {k: v for k, v in denominators.items() if k != "norm_length"}
    reference_kwargs = dict(ref_logp=ref_logp, rollout_logp=rollout_logp, **denominator_kwargs)
    if token_level or not need_grads:
        loss, metrics = policy_loss(logp_ST, old_logp, advantages, mask, spec, **reference_kwargs)
    else:  # GSPO: d loss / d logp from the whole sequences, then pass 2 over the chunks
        with torch.enable_grad():
            x = logp_ST.requires_grad_()
            loss, metrics = policy_loss(x, old_logp, advantages, mask, spec, **reference_kwargs)
            (grad_logp_ST,) = torch.autograd.grad(loss, x)
        grad_logp_v = grad_logp_ST[s_idx, t_idx]
        local_v = inputs.tokens if shard is None else inputs.tokens - shard.vocab_start
        for i0 in range(0, n_valid, chunk):
            sl = slice(i0, min(i0 + chunk, n_valid))
            h, logits = chunk_logits(sl)
            backprop(sl, h, logits, local_v[sl][None], saved_stats[0][sl][None], saved_stats[1][sl][None],
                     grad_logp_v[sl])
            del h, logits

    if grad_hidden is not None and shard is not None and hidden_grad_all_reduce:
        dist.all_reduce(grad_hidden, group=shard.group)
    if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
        grad_hidden = grad_hidden.to(hidden.dtype)
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    return _Result(loss.detach(), metrics, grad_hidden, grad_weight)


@torch.compiler.disable
def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_tokens: int | None = None,
    group: dist.ProcessGroup | None = None,
    hidden_grad_all_reduce: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """grpo_loss(hidden @ weight.T, tokens, ...) without materialising the logits.

    Args:
        hidden: [S, T, H] float hidden states (the output layer's input); hidden[s, t] gives the
            logits that predict tokens[s, t] (for a causal LM over prompt + completion, pass the
            slice shifted by one: a strided view is gathered chunk by chunk, never copied whole).
        weight: [V, H] output-layer weight, hidden's dtype and device (with ``group``: this
            rank's vocabulary shard [V/tp, H]).
        tokens: [S, T] integer ids (global ids with ``group``); ids at masked positions are
            never used. An unmasked id outside [0, V) has log-prob -inf.
        old_logp, advantages, mask, spec, ref_logp, rollout_logp, global_tokens,
            global_sequences: exactly as in r1mega.algo.policy_loss.
        temperature: > 0, the sampling temperature (logits are divided by it).
        chunk_tokens: unmasked tokens per chunk (default: :data:`CHUNK_LOGIT_BYTES` of logits).
        group: tensor-parallel group over which the vocabulary is sharded, or None (tp = 1).
        hidden_grad_all_reduce: with ``group``, sum the ranks' partial hidden gradients (default);
            False leaves each rank's partial (sequence parallelism, see the module docstring).
        backend: None (auto), "triton" or "torch" (the same chunked algorithm with torch math).

    Returns:
        (loss, metrics) as policy_loss returns them; the loss is differentiable with respect to
        hidden and weight (whichever require grad; both gradients are computed in this call).
    """
    check_floating("hidden", hidden, ndim=3)
    check_floating("weight", weight, ndim=2)
    H = hidden.shape[2]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, H] with H = {H} like hidden, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype} on {weight.device}) must have hidden's dtype and device "
                         f"({hidden.dtype} on {hidden.device})")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    check_integer("tokens", tokens)
    check_token_inputs(tokens, old_logp, advantages, mask, ref_logp, rollout_logp, hidden.shape[:2])
    temperature = positive("temperature", temperature)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], weight.dtype, weight.device)
    elif isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {describe(chunk_tokens)}")
    spec.check_inputs(has_ref=ref_logp is not None, has_rollout=rollout_logp is not None)
    denominators = spec.denominators(global_tokens, global_sequences)
    backend = resolve_backend(backend, hidden)
    shard = vocab_shard(group, weight.shape[0])
    grad_enabled = torch.is_grad_enabled()  # under no_grad: the loss only, no gradient work
    with torch.no_grad():
        result = _forward(hidden, weight, tokens, old_logp, advantages, mask, ref_logp, rollout_logp,
                          spec=spec, denominators=denominators, temperature=temperature,
                          chunk=chunk_tokens, backend=backend, shard=shard,
                          hidden_grad_all_reduce=bool(hidden_grad_all_reduce),
                          need_grad_h=grad_enabled and hidden.requires_grad,
                          need_grad_w=grad_enabled and weight.requires_grad)
    loss = _LinearGrpoGrads.apply(hidden, weight, result.loss, result.grad_hidden, result.grad_weight)
    return loss, result.metrics
