"""What an engine is asked for (:class:`SamplingParams`) and what it returns (:class:`Completion`),
and the one torch reference of how logits become a sampling distribution.

The distribution follows vLLM's sampler, so that every engine and the trainer agree on what the
sampler's log-prob of a token is: logits / temperature, then top-k, then top-p (tokens outside the
kept set get -inf), renormalised. ``temperature == 0`` is greedy decoding. The log-prob an engine
returns is that of the processed distribution (vLLM's ``logprobs_mode="processed_logprobs"``):
with top-k and top-p off it equals ``log_softmax(logits / temperature)``, which is what
:meth:`r1mega.models.Policy.logprobs` computes at the same temperature; with them on, the trainer
must apply the same truncation (:func:`processed_logits`) for its ratios to compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; validated on construction (a ValueError names the field).

    n: completions per prompt (GRPO's G). temperature: 0 is greedy. top_k: 0 keeps every token.
    top_p: 1.0 keeps every token. max_new_tokens: the completion budget (finish reason "length").
    stop: strings that end a completion when its text contains one (the token that completes the
    string is the last one kept; needs an engine with a tokenizer). stop_token_ids: tokens that
    end a completion (kept as its last token), in addition to the model's end-of-sequence tokens
    unless ignore_eos. seed: with a seed, completion j of prompt i depends only on (seed, i, j),
    the prompt and the weights, not on the other prompts or how the engine batches them.
    return_logprobs: the sampler's log-prob of every generated token. return_routes: the experts
    every token was routed to, per MoE layer (router replay; MoE models only).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None
    return_logprobs: bool = True
    return_routes: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _int("n", self.n, 1)
        _int("max_new_tokens", self.max_new_tokens, 1)
        _int("top_k", self.top_k, 0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {p!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop: every stop string must be a non-empty str, got {s!r}")
        for i in self.stop_token_ids:
            _int("stop_token_ids", i, 0)
        for name in ("ignore_eos", "return_logprobs", "return_routes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"SamplingParams.{name} must be an int >= {low}, got {value!r}")


@dataclass
class Completion:
    """One sampled completion of one prompt.

    token_ids: int64 [L], the generated tokens (a stop token or the token that completed a stop
    string is included). logprobs: float32 [L], the sampler's log-prob of each (None unless
    asked). routes: int16 [P + L, moe_layers, top_k], the experts each position of prompt and
    completion was routed to (the last position is never run and repeats experts 0..k-1).
    first_token_s / finish_s: seconds from the start of the generate call to its first token and
    to its end.
    """

    prompt_index: int
    sample_index: int
    token_ids: torch.Tensor
    finish_reason: FinishReason
    logprobs: Optional[torch.Tensor] = None
    stop_reason: Union[str, int, None] = None  # the stop string or token id that ended it
    routes: Optional[torch.Tensor] = None
    first_token_s: float = 0.0
    finish_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.token_ids.numel())


def check_prompts(prompt_token_ids: Sequence[Sequence[int]], vocab_size: int, max_len: int,
                  max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of ints; a ValueError names the first bad prompt."""
    if isinstance(prompt_token_ids, torch.Tensor) or not isinstance(prompt_token_ids, Sequence) \
            or not len(prompt_token_ids):
        raise ValueError("prompt_token_ids must be a non-empty sequence of token-id sequences")
    out = []
    for i, ids in enumerate(prompt_token_ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} is not an int in [0, {vocab_size})")
        if len(ids) + max_new_tokens > max_len:
            raise ValueError(f"prompt {i}: {len(ids)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"{max_len} positions")
        out.append(ids)
    return out


def processed_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """[..., V] float32 logits of the sampling distribution: / temperature, top-k, top-p (-inf outside).

    temperature 0 (greedy) leaves the logits unscaled. Top-p keeps the smallest set of most
    likely tokens whose mass reaches top_p (at least one token); ties at the boundary are kept.
    """
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        # ties with the last kept logit stay kept: compare values, not positions
        kept_min = sorted_x.masked_fill(drop_sorted, math.inf).amin(dim=-1, keepdim=True)
        x = x.masked_fill(x < kept_min, -math.inf)
    return x


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """log-prob of `tokens` [...] under :func:`processed_logits` of `logits` [..., V] (float32)."""
    x = processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.log_softmax(x, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
