"""Token log-probs, entropies and the GRPO loss from vocabulary-parallel (tensor-parallel) logits.

Megatron's output layer leaves each tensor-parallel rank with a shard of the logits: [..., V/tp],
rank r holding the vocabulary ids [r V/tp, (r + 1) V/tp). Megatron pads the vocabulary to a
multiple of tp (``make_vocab_size_divisible_by`` times tp), so every shard has the same width;
the padding columns are real outputs of the model's (padded) output layer and take part in the
softmax exactly as in megatron's own ``vocab_parallel_cross_entropy``. The results here equal
those of the unsharded ops (r1mega.ops.token_logprobs / grpo_loss) on the concatenated logits.

What crosses the group (megatron's VocabParallelCrossEntropy does the same three reductions in
three collectives; here they are two): per token,
    1. all-reduce MAX of the shard maxima m_r                             -> the global max M
    2. one all-reduce SUM of a [2, N] (with the entropy [3, N]) float32 stack:
       s_r e^(m_r - M)  (sum-exp rescaled to M)                        -> S
       the target logit from the shard that owns the token, 0 elsewhere  -> z_y
       e^(m_r - M) (t_r + (m_r - M) s_r)  (sum p (z - M), rescaled)       -> T
then logp = (z_y - M) - log S and H = log S - T / S on every rank. Nothing of size [N, V] is
communicated. The per-shard partials come from one pass over the shard:
r1mega_kernels.vocab_parallel (Triton) or a chunked torch twin (backend "torch").

Backward is local, with no communication: d logp / d z_v = 1[v = y] - softmax_v with the GLOBAL
log-normaliser, and d H / d z_v = -p_v (log p_v + H) with the global p and H; r1mega.ops.logprob's
backward pass (one read of the shard, one write of its gradient) computes exactly that when given
M, log S and the token ids shifted into the shard (ids owned by another rank match no column).
The collectives live in the forward of a ``torch.autograd.Function`` whose backward is written
out, so autograd never differentiates through an all-reduce.

``group=None`` means tp = 1 (so does a group of size 1): no collective runs and the result is the
plain op's, bit for bit. The loss (:func:`vocab_parallel_grpo_loss`) is r1mega.algo.policy_loss of
the all-reduced log-probs, so options, metrics, global denominators and gradient accumulation
behave exactly as in the unsharded loss; the per-token loss terms are [N] work, identical on every
rank. Masked tokens' logits are never read.

Not torch.compile-safe: the public functions are wrapped in ``torch.compiler.disable`` (a compiled
caller graph-breaks around them and runs them eagerly), because the forward issues collectives
from a Python autograd.Function. Use r1mega.ops' plain ops where tp = 1 and compilation matters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from r1mega.algo import policy_loss
from r1mega.algo.checks import check_floating, check_shape
from r1mega.algo.loss_spec import LossSpec
from r1mega.ops.backend import resolve_backend
from r1mega.ops.logprob import (
    as_rows,
    chunk_rows,
    compute_dtype,
    gather_scaled,
    logits_grad,
    logprob_fwd,
    row_spans,
)


class VocabShard(NamedTuple):
    """Where this rank's logits sit in the vocabulary, and the group that holds the other shards."""

    group: dist.ProcessGroup
    rank: int
    world: int
    vocab_start: int  # global id of the shard's first column
    vocab_size: int  # the whole (padded) vocabulary: shard width x world

    @property
    def vocab_end(self) -> int:
        return self.vocab_start + self.vocab_size // self.world


def vocab_shard(group: dist.ProcessGroup | None, shard_width: int) -> VocabShard | None:
    """The shard of ``group``'s rank in megatron's layout, or None for tp = 1 (no group, or size 1)."""
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    world = dist.get_world_size(group)
    if world == 1:
        return None
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return VocabShard(group, rank, world, rank * shard_width, shard_width * world)


# ---------------------------------------------------------------------------------------------
# Per-shard partials and their combination.
# ---------------------------------------------------------------------------------------------


def _torch_partials(
    logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None, temperature: float,
    with_entropy: bool, vocab_start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, s, t, z_y) of an [S, T, V] shard in row chunks, like r1mega_kernels.vocab_parallel."""
    S, T, _ = logits.shape
    dtype = compute_dtype(logits.dtype)
    m_all, s_all, t_all, zy_all = (torch.zeros(S * T, dtype=dtype, device=logits.device) for _ in range(4))
    local = tokens.reshape(-1) - vocab_start
    for n0, n1, (rows,) in row_spans([logits], chunk_rows(logits)):
        zy_all[n0:n1] = gather_scaled(rows, local[n0:n1]).to(dtype) / temperature  # -inf outside the shard
        z = rows.to(dtype) / temperature
        m = z.amax(-1, keepdim=True)
        z -= m.masked_fill(m == float("-inf"), 0.0)
        e = z.exp()
        s_all[n0:n1] = e.sum(-1)
        m_all[n0:n1] = m.squeeze(-1)
        if with_entropy:
            t_all[n0:n1] = e.mul_(z).masked_fill_(z == float("-inf"), 0.0).sum(-1)
    out = [x.view(S, T) for x in (m_all, s_all, t_all, zy_all)]
    if valid is not None:  # rows not to be read (padding, possibly NaN): zeros, as the kernel
        skipped = valid == 0
        for x in out:
            x.masked_fill_(skipped, 0.0)
    return out[0], out[1], out[2], out[3]


def _partials(logits, tokens, valid, temperature, with_entropy, backend, vocab_start):
    if backend == "torch":
        return _torch_partials(logits, tokens, valid, temperature, with_entropy, vocab_start)
    from r1mega_kernels.vocab_parallel import logprob_partials

    out = logprob_partials(logits, tokens, vocab_start=vocab_start, temperature=temperature,
                           with_entropy=with_entropy, valid=valid)
    t = out.sum_exp_shifted if with_entropy else out.sum_exp
    return out.row_max, out.sum_exp, t, out.target_logit


def combine_partials(
    row_max: torch.Tensor, sum_exp: torch.Tensor, sum_exp_shifted: torch.Tensor | None,
    target_logit: torch.Tensor, tokens: torch.Tensor, shard: VocabShard,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """All-reduce one rank's per-token partials into (logp, entropy or None, M, log S).

    Two collectives over ``shard.group``: MAX of the [N] maxima, then SUM of a [2 or 3, N] stack
    (see the module docstring). Every rank gets the same values. Inputs are modified.
    """
    with_entropy = sum_exp_shifted is not None
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=shard.group)
    shift = global_max.masked_fill(global_max == float("-inf"), 0.0)  # a row of -inf only: terms 0, not NaN
    alpha = torch.exp(row_max - shift)
    owner = (tokens >= shard.vocab_start) & (tokens < shard.vocab_end)
    parts = [sum_exp * alpha, torch.where(owner, target_logit, 0.0)]
    if with_entropy:
        # Re-centre t_r on M; a shard of -inf only (s_r = 0) adds nothing (no -inf * 0).
        parts.append(torch.where(sum_exp > 0, alpha * (sum_exp_shifted + (row_max - shift) * sum_exp), 0.0))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=shard.group)
    total, z_y = stacked[0], stacked[1]
    z_y = z_y.masked_fill((tokens < 0) | (tokens >= shard.vocab_size), float("-inf"))  # no owner: p = 0
    log_total = total.log()
    # (z_y - M) - log S: the unsharded kernel's expression, exact for large logits.
    logp = (z_y - global_max) - log_total
    entropy = log_total - stacked[2] / total if with_entropy else None
    return logp, entropy, global_max, log_total


class LogprobStats(NamedTuple):
    """Per-token results of the forward pass over (a shard of) the logits, each of the tokens' shape.

    row_max and row_logsum are the GLOBAL M and log S; local_tokens are the token ids shifted into
    this shard's columns: with the logits they are what r1mega.ops.logprob.logits_grad needs.
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    row_max: torch.Tensor
    row_logsum: torch.Tensor
    local_tokens: torch.Tensor


def sharded_logprob_stats(
    logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None, temperature: float,
    with_entropy: bool, backend: str, shard: VocabShard | None,
) -> LogprobStats:
    """Log-probs (and entropies) of [S, T, V_shard] logits and [S, T] global ids, all-reduced.

    ``valid`` (optional, [S, T] uint8/bool): rows where it is 0 are not read and give 0, as in
    r1mega.ops.logprob. ``shard=None``: tp = 1, r1mega.ops.logprob's own forward, no collective.
    """
    if shard is None:
        logp, entropy, row_max, row_logsum = logprob_fwd(logits, tokens, valid, temperature, with_entropy, backend,
                                                          False)
        return LogprobStats(logp, entropy if with_entropy else None, row_max, row_logsum, tokens)
    m, s, t, z_y = _partials(logits, tokens, valid, temperature, with_entropy, backend, shard.vocab_start)
    logp, entropy, row_max, row_logsum = combine_partials(m, s, t if with_entropy else None, z_y, tokens, shard)
    if valid is not None:  # the unsharded kernels' convention for rows they skip
        skipped = valid == 0
        for x in (logp, row_max, row_logsum) + ((entropy,) if with_entropy else ()):
            x.masked_fill_(skipped, 0.0)
    return LogprobStats(logp, entropy, row_max, row_logsum, tokens - shard.vocab_start)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Forward: one pass over the shard and the all-reduces. Backward: one local pass, no collective."""

    @staticmethod
    def forward(ctx, logits, tokens, valid, temperature, with_entropy, backend, shard):
        stats = sharded_logprob_stats(logits, tokens, valid, temperature, with_entropy, backend, shard)
        ctx.save_for_backward(logits, stats.local_tokens, stats.row_max, stats.row_logsum, stats.entropy)
        ctx.options = (temperature, backend)
        ctx.set_materialize_grads(False)
        entropy = stats.entropy
        if entropy is None:
            entropy = stats.logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return stats.logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_tokens, row_max, row_logsum, entropy = ctx.saved_tensors
        temperature, backend = ctx.options
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return (None,) * 7
        grad = logits_grad(logits, local_tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy,
                           temperature, backend, False)
        return (grad,) + (None,) * 6


def _logprobs(logits_shard, tokens, group, temperature, backend, with_entropy, valid=None):
    logits3, tokens2 = as_rows(logits_shard, tokens, temperature)
    backend = resolve_backend(backend, logits_shard)
    shard = vocab_shard(group, logits_shard.shape[-1])
    logp, entropy = _VocabParallelLogprobs.apply(logits3, tokens2, valid, float(temperature), with_entropy, backend,
                                                 shard)
    shape = logits_shard.shape[:-1]
    return logp.view(shape), entropy.view(shape) if with_entropy else None


@torch.compiler.disable
def vocab_parallel_token_logprobs(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens] over the whole vocabulary, from this rank's shard.

    Args:
        logits_shard: [..., V/tp] this rank's logits (column v is vocabulary id rank * V/tp + v),
            float; read in place (only the vocabulary dimension must be contiguous for "triton").
        tokens: [...] GLOBAL integer ids. An id outside [0, V) gets log-prob -inf.
        group: the tensor-parallel process group (every member calls this with its shard), or
            None for tp = 1 (then this is r1mega.ops.token_logprobs).
        temperature: > 0, applied inside.
        backend: None (auto), "triton" or "torch" (see r1mega.ops).

    Returns:
        [...] float32 log-probs (float64 for float64 logits), the same on every rank;
        differentiable, with d/d(logits_shard) this shard's slice of the unsharded gradient.
    """
    return _logprobs(logits_shard, tokens, group, temperature, backend, with_entropy=False)[0]


@torch.compiler.disable
def vocab_parallel_token_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy of the full softmax) from this rank's shard; arguments as above."""
    logp, entropy = _logprobs(logits_shard, tokens, group, temperature, backend, with_entropy=True)
    assert entropy is not None
    return logp, entropy


def check_token_inputs(tokens, old_logp, advantages, mask, ref_logp, rollout_logp, shape_ST) -> None:
    """ValueError naming the argument unless the [S, T] per-token inputs match ``shape_ST``."""
    check_shape("tokens", tokens, shape_ST, like="the logits' leading dimensions")
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


@torch.compiler.disable
def vocab_parallel_grpo_loss(
    logits_shard: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    group: dist.ProcessGroup | None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_sequences: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """r1mega.ops.grpo_loss of the unsharded logits, computed from this rank's vocabulary shard.

    Args:
        logits_shard: [S, T, V/tp] this rank's shard (see :func:`vocab_parallel_token_logprobs`).
        tokens: [S, T] GLOBAL ids; ids at masked positions are never used (-100 is fine).
        old_logp, advantages, mask, spec, ref_logp, rollout_logp, global_tokens, global_sequences:
            as r1mega.algo.policy_loss.
        group: the tensor-parallel group, or None for tp = 1.
        temperature, backend: as r1mega.ops.grpo_loss.

    Returns:
        (loss, metrics), identical on every rank of the group and equal to the unsharded
        grpo_loss; d loss / d logits_shard is this shard's slice of the unsharded gradient.
        The tensor-parallel ranks hold the same tokens, so they must not also sum their losses or
        gradients of other parameters as if they were data-parallel ranks.
    """
    check_floating("logits_shard", logits_shard, ndim=3)
    shape_ST = logits_shard.shape[:2]
    check_token_inputs(tokens, old_logp, advantages, mask, ref_logp, rollout_logp, shape_ST)
    spec.check_inputs(has_ref=ref_logp is not None, has_rollout=rollout_logp is not None)
    spec.denominators(global_tokens, global_sequences)  # refused here, before the all-reduces
    valid_u8 = (mask != 0).contiguous().view(torch.uint8)  # masked rows are never read
    logp, _ = _logprobs(logits_shard, tokens, group, temperature, backend, with_entropy=False, valid=valid_u8)
    return policy_loss(logp, old_logp, advantages, mask, spec, ref_logp=ref_logp, rollout_logp=rollout_logp,
                       global_tokens=global_tokens, global_sequences=global_sequences)
