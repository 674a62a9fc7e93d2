"""Reference (plain torch) token log-probabilities and entropies from logits.

Shape legend: V vocabulary; ``...`` any leading shape (e.g. [S, T]). These are the exact
references the fused Triton kernels are tested against: simple, and computed in float32 at least
(float64 logits stay float64).
"""

from __future__ import annotations

import torch

from r1mega.algo.checks import check_floating, check_integer, positive


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at the given tokens.

    Args:
        logits: [..., V] floating logits.
        tokens: [...] integer token ids in [0, V).
        temperature: > 0; the sampling temperature the tokens were drawn with.

    Returns:
        [...] log-probabilities, float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    z_V = _scaled_logits(logits, temperature)
    check_integer("tokens", tokens)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} but must be logits' shape without the vocab "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    return torch.log_softmax(z_V, dim=-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dimension.

    Computed as logsumexp(z) - sum(p * z) on z shifted by its maximum (entropy is shift-invariant),
    so neither term is large and nothing cancels catastrophically for logits like 1e4. Logits of
    -inf (banned tokens) have p = 0 and contribute nothing, with finite gradients.

    Args:
        logits: [..., V] floating logits.
        temperature: > 0.

    Returns:
        [...] entropies (nats), float32 (float64 for float64 logits), differentiable w.r.t. logits.
    """
    z_V = _scaled_logits(logits, temperature)
    # The shift needs no gradient: the entropy's derivative along (1, ..., 1) is zero.
    z_V = z_V - z_V.amax(dim=-1, keepdim=True).detach()
    p_V = torch.softmax(z_V, dim=-1)
    # p * z would be 0 * (-inf) = NaN for banned tokens: use z = 0 where p = 0.
    return torch.logsumexp(z_V, dim=-1) - (p_V * torch.where(p_V > 0, z_V, 0.0)).sum(-1)


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    check_floating("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension [..., V]")
    temperature = positive("temperature", temperature)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
