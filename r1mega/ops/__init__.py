"""Fused ops on logits with autograd, compile-safe (torch.library custom ops), one reference each.

    token_logprobs / token_logprobs_and_entropy   reference: r1mega.algo.token_logprobs (+ entropy_from_logits)
    grpo_loss                                     reference: r1mega.algo.policy_loss of token_logprobs
    vocab_parallel_token_logprobs (+ _and_entropy), vocab_parallel_grpo_loss
                                                  the same from tensor-parallel vocabulary shards
                                                  (all-reduces of per-token partials; see vocab_parallel)
    linear_grpo_loss                              grpo_loss(hidden @ weight.T, ...) chunked over tokens:
                                                  the full logits never exist (see linear)

Each takes ``backend=None | "triton" | "torch"``: the Triton kernels of ``r1mega_kernels`` where
they can run (CUDA, or the CPU interpreter with TRITON_INTERPRET=1), else a chunked torch
implementation with the same memory behaviour (no [N, V] float32 copy of the logits).
"""

from r1mega.ops.backend import BACKENDS, resolve_backend
from r1mega.ops.grpo_loss import grpo_loss, reference_grpo_loss
from r1mega.ops.linear import linear_grpo_loss
from r1mega.ops.logprob import (
    reference_token_logprobs,
    reference_token_logprobs_and_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from r1mega.ops.vocab_parallel import (
    vocab_parallel_grpo_loss,
    vocab_parallel_token_logprobs,
    vocab_parallel_token_logprobs_and_entropy,
)

__all__ = [
    "BACKENDS",
    "grpo_loss",
    "linear_grpo_loss",
    "reference_grpo_loss",
    "reference_token_logprobs",
    "reference_token_logprobs_and_entropy",
    "resolve_backend",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "vocab_parallel_grpo_loss",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_token_logprobs_and_entropy",
]
