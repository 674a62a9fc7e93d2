"""Token log-probabilities (and entropies) from logits without an [N, V] float32 copy.

Alignment: row ``logits[..., :]`` predicts ``tokens[...]`` at the same index. For a causal LM whose
output over ``input_ids`` [S, P + T] predicts the next token, pass
``logits[:, P - 1 : P + T - 1]`` with ``tokens = input_ids[:, P:]``: the slice is a strided view
and is read in place (only the vocabulary dimension must be contiguous).

Backends (``backend=None`` picks "triton" where it can run, see :mod:`r1mega.ops.backend`):
  "triton": r1mega_kernels.logprob: one pass over the logits forward (online log-sum-exp),
            one read and one write backward; saves the row max and log-sum per token.
  "torch":  the same computation in row chunks of at most ``CHUNK_ELEMENTS`` logits (16 MiB of
            float32 per temporary on CPU), the softmax recomputed per chunk in the backward: no
            [N, V] float32 copy; saves the same per-token values as the kernels.
Both are ``torch.library.custom_op`` s with a fake implementation and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` traces through them without a graph break.

``inplace_backward=True`` writes d(loss)/d(logits) into the logits buffer, which saves the one
[N, V] allocation of the backward. Use it only when nothing else reads those logits afterwards
(an lm_head output is not needed by its own backward); a second backward through the same graph
then fails loudly, as the saved logits were modified.

The references (:data:`reference_token_logprobs`, :func:`reference_token_logprobs_and_entropy`)
are r1mega.algo's plain torch functions: the tests and benchmarks compare against these.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from r1mega.algo import entropy_from_logits
from r1mega.algo import token_logprobs as _algo_token_logprobs
from r1mega.algo.checks import check_floating, check_integer, positive
from r1mega.ops.backend import resolve_backend

# The one torch reference of this op.
reference_token_logprobs = _algo_token_logprobs

# Logits per chunk of the torch backend (rows = CHUNK_ELEMENTS // V): 16 MiB per float32
# temporary on CPU; on a GPU 128 MiB, which amortises the kernel launches of each chunk.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}


def chunk_rows(logits: torch.Tensor) -> int:
    """Rows of [..., V] `logits` per chunk of the torch backend (at least 1)."""
    return max(1, CHUNK_ELEMENTS.get(logits.device.type, 1 << 22) // logits.shape[-1])


def reference_token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`token_logprobs_and_entropy`: r1mega.algo's two functions."""
    return (
        _algo_token_logprobs(logits, tokens, temperature=temperature),
        entropy_from_logits(logits, temperature=temperature),
    )


# ---------------------------------------------------------------------------------------------
# The chunked torch backend (same outputs and saved values as the Triton kernels).
# ---------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch backend computes in for logits of `dtype`: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def row_spans(tensors: list[torch.Tensor], chunk: int) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """(n0, n1, [rows n0..n1 of each tensor as a [r, V] view]) over the rows of [S, T, V] tensors."""
    S, T, V = tensors[0].shape
    try:
        flat = [x.view(S * T, V) for x in tensors]
    except RuntimeError:  # strided leading dims (e.g. a slice of a longer sequence): per sequence
        for s in range(S):
            for t0 in range(0, T, chunk):
                t1 = min(t0 + chunk, T)
                yield s * T + t0, s * T + t1, [x[s, t0:t1] for x in tensors]
        return
    for n0 in range(0, S * T, chunk):
        n1 = min(n0 + chunk, S * T)
        yield n0, n1, [x[n0:n1] for x in flat]


def gather_scaled(z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """z[r, tokens[r]]; -inf for ids outside [0, V) (probability 0), as the kernels do."""
    V = z.shape[-1]
    ok = (tokens >= 0) & (tokens < V)
    picked = z.gather(-1, tokens.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~ok, float("-inf"))


def _torch_forward(
    logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    S, T = logits.shape[:2]
    dtype = compute_dtype(logits.dtype)
    logp, row_max, row_logsum = (torch.empty(S * T, dtype=dtype, device=logits.device) for _ in range(3))
    entropy = torch.empty(S * T if with_entropy else 0, dtype=dtype, device=logits.device)
    flat_tokens = tokens.reshape(-1)
    for n0, n1, (rows,) in row_spans([logits], chunk_rows(logits)):
        z = rows.to(dtype) / temperature  # the chunk's only full-size copy
        m = z.amax(-1, keepdim=True)
        z -= m.masked_fill(m == float("-inf"), 0.0)  # an all -inf row stays -inf, not NaN
        e = z.exp()
        s = e.sum(-1)
        log_s = s.log()
        logp[n0:n1] = gather_scaled(z, flat_tokens[n0:n1]) - log_s
        row_max[n0:n1] = m.squeeze(-1)
        row_logsum[n0:n1] = log_s
        if with_entropy:
            # sum p (z - m) without 0 * -inf for banned tokens.
            e.mul_(z).masked_fill_(z == float("-inf"), 0.0)
            entropy[n0:n1] = log_s - e.sum(-1) / s
    if valid is not None:  # the kernels' convention for rows they skip
        skipped = valid.reshape(-1) == 0
        for x in (logp, row_max, row_logsum) + ((entropy,) if with_entropy else ()):
            x.masked_fill_(skipped, 0.0)
    return logp.view(S, T), entropy.view(S, T) if with_entropy else entropy, row_max.view(S, T), row_logsum.view(S, T)


def _torch_backward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    grad_logp: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor,
) -> None:
    V = logits.shape[-1]
    dtype = compute_dtype(logits.dtype)
    flat = [x.reshape(-1) for x in (tokens, row_max, row_logsum, grad_logp)]
    with_entropy = entropy is not None and grad_entropy is not None
    if with_entropy:
        flat += [entropy.reshape(-1), grad_entropy.reshape(-1)]
    for n0, n1, (rows, out_rows) in row_spans([logits, out], chunk_rows(logits)):
        y, m, log_s, g = (x[n0:n1] for x in flat[:4])
        g = g.to(dtype)
        live = g != 0
        log_p = rows.to(dtype) / temperature
        log_p -= m.unsqueeze(-1)
        log_p -= log_s.unsqueeze(-1)
        p = log_p.exp()
        if with_entropy:
            h, g_h = flat[4][n0:n1], flat[5][n0:n1].to(dtype)
            live |= g_h != 0
            # coef = g + g_H (log p + H), with 0 where p = 0 (log p = -inf)
            coef = log_p.add_(h.unsqueeze(-1)).mul_(g_h.unsqueeze(-1)).masked_fill_(p == 0, 0.0)
            coef += g.unsqueeze(-1)
            dz = p.mul_(coef).neg_()
        else:
            dz = p.mul_(g.unsqueeze(-1)).neg_()
        ok = (y >= 0) & (y < V)
        dz.scatter_add_(-1, y.clamp(0, V - 1).unsqueeze(-1), torch.where(ok, g, 0.0).unsqueeze(-1))
        dz /= temperature
        dz.masked_fill_(~live.unsqueeze(-1), 0.0)  # masked tokens: exactly 0, even for NaN logits
        out_rows.copy_(dz)


# ---------------------------------------------------------------------------------------------
# Custom ops: forward, backward (new buffer), backward in place.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("r1mega::logprob_fwd", mutates_args=())
def logprob_fwd(
    logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None, temperature: float, with_entropy: bool,
    backend: str, inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy or an empty tensor, row max, row log-sum), each [S, T], of [S, T, V] logits.

    Rows where ``valid`` (optional, [S, T] bool) is False are not read and give 0. The custom op
    ``r1mega::logprob_fwd`` with its autograd formula (differentiable in `logits` through logp and
    entropy): the building block of :func:`token_logprobs`, r1mega.ops.grpo_loss and
    r1mega.ops.vocab_parallel. `backend` is already resolved ("triton" or "torch");
    `inplace_backward` as in the module docstring.
    """
    if backend == "torch":
        return _torch_forward(logits, tokens, valid, temperature, with_entropy)
    from r1mega_kernels.logprob import logprob_forward

    out = logprob_forward(logits, tokens, temperature=temperature, with_entropy=with_entropy, valid=valid)
    entropy = out.entropy if out.entropy is not None else logits.new_empty(0, dtype=torch.float32)
    return out.logp, entropy, out.row_max, out.row_logsum


@logprob_fwd.register_fake
def _(logits, tokens, valid, temperature, with_entropy, backend, inplace_backward):
    dtype = compute_dtype(logits.dtype)

    def new():
        return tokens.new_empty(tokens.shape, dtype=dtype)

    return new(), new() if with_entropy else tokens.new_empty(0, dtype=dtype), new(), new()


def _backward_into(out, logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, backend):
    if backend == "torch":
        _torch_backward(logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, out)
        return
    from r1mega_kernels.logprob import logprob_backward

    logprob_backward(logits, tokens, row_max, row_logsum, grad_logp, entropy=entropy, grad_entropy=grad_entropy,
                     temperature=temperature, out=out)


@torch.library.custom_op("r1mega::logprob_bwd", mutates_args=())
def _logprob_bwd(
    logits: torch.Tensor, tokens: torch.Tensor, row_max: torch.Tensor, row_logsum: torch.Tensor,
    grad_logp: torch.Tensor, entropy: torch.Tensor | None, grad_entropy: torch.Tensor | None,
    temperature: float, backend: str,
) -> torch.Tensor:
    """d(loss)/d(logits) in a new [S, T, V] tensor of the logits' dtype."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, backend)
    return out


@_logprob_bwd.register_fake
def _(logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("r1mega::logprob_bwd_", mutates_args=("logits",))
def _logprob_bwd_inplace(
    logits: torch.Tensor, tokens: torch.Tensor, row_max: torch.Tensor, row_logsum: torch.Tensor,
    grad_logp: torch.Tensor, entropy: torch.Tensor | None, grad_entropy: torch.Tensor | None,
    temperature: float, backend: str,
) -> None:
    """d(loss)/d(logits) written over the logits."""
    _backward_into(logits, logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature,
                   backend)


def logits_grad(
    logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, backend, inplace
) -> torch.Tensor:
    """The backward pass over the logits: a new buffer, or the logits buffer itself when ``inplace``."""
    if grad_logp is None:
        grad_logp = torch.zeros_like(row_max)
    if entropy is not None and grad_entropy is None:
        entropy = None
    args = (tokens, row_max, row_logsum, grad_logp.contiguous(), entropy,
            None if grad_entropy is None else grad_entropy.contiguous(), temperature, backend)
    if not inplace:
        return _logprob_bwd(logits, *args)
    buffer = logits.detach()
    _logprob_bwd_inplace(buffer, *args)
    return buffer


def _setup_context(ctx, inputs, output):
    logits, tokens, _valid, temperature, with_entropy, backend, inplace_backward = inputs
    _, entropy, row_max, row_logsum = output
    ctx.save_for_backward(logits, tokens, row_max, row_logsum, entropy if with_entropy else None)
    ctx.options = (temperature, backend, inplace_backward)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_row_logsum):
    logits, tokens, row_max, row_logsum, entropy = ctx.saved_tensors
    temperature, backend, inplace = ctx.options
    if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
        return (None,) * 7
    grad = logits_grad(logits, tokens, row_max, row_logsum, grad_logp, entropy, grad_entropy, temperature, backend,
                       inplace)
    return (grad,) + (None,) * 6


torch.library.register_autograd("r1mega::logprob_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def as_rows(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate like the reference and view logits [..., V] as [S, T, V] and tokens as [S, T].

    The logits are never copied (a ValueError names them if their leading dimensions cannot be
    viewed as [S, T]); tokens (small) are made contiguous int64/int32.
    """
    check_floating("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension [..., V]")
    positive("temperature", temperature)
    check_integer("tokens", tokens)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but must be logits' shape without the vocab "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if len(lead) <= 2:
        logits3 = logits
        while logits3.dim() < 3:
            logits3 = logits3.unsqueeze(0)
    else:
        try:
            logits3 = logits.view(-1, lead[-1], V)
        except RuntimeError:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} and strides {logits.stride()} cannot be viewed as "
                "[S, T, V] without a copy; pass them as [S, T, V]"
            ) from None
    if tokens.dtype not in (torch.int32, torch.int64):
        tokens = tokens.long()
    return logits3, tokens.reshape(logits3.shape[:2]).contiguous()


def _logprobs(logits, tokens, temperature, backend, inplace_backward, with_entropy):
    logits3, tokens2 = as_rows(logits, tokens, temperature)
    backend = resolve_backend(backend, logits)
    logp, entropy, _, _ = logprob_fwd(logits3, tokens2, None, float(temperature), with_entropy, backend,
                                       bool(inplace_backward))
    shape = logits.shape[:-1]
    return logp.view(shape), entropy.view(shape) if with_entropy else None


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``, like r1mega.algo.token_logprobs.

    Args:
        logits: [..., V] floating logits; logits[i] predicts tokens[i] (see the module docstring
            for the causal-LM shift). Read in place: never copied to float32 as a whole.
        tokens: [...] integer ids. An id outside [0, V) gets log-prob -inf.
        temperature: > 0, applied inside.
        backend: None (auto), "triton" or "torch".
        inplace_backward: write the gradient into the logits buffer (see the module docstring).

    Returns:
        [...] float32 log-probs (float64 for float64 logits, torch backend), differentiable.
    """
    return _logprobs(logits, tokens, temperature, backend, inplace_backward, with_entropy=False)[0]


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logprobs, entropy of softmax(logits / temperature)) from the same single pass.

    Arguments as :func:`token_logprobs`. Both outputs are differentiable; the entropy equals
    r1mega.algo.entropy_from_logits.
    """
    logp, entropy = _logprobs(logits, tokens, temperature, backend, inplace_backward, with_entropy=True)
    assert entropy is not None
    return logp, entropy
