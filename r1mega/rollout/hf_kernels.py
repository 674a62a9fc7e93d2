"""Decode-step kernels for the ``hf`` engine, registered with transformers' own extension points.

transformers >= 5 dispatches attention (``AttentionInterface``) and routed experts
(``ExpertsInterface``) by name; the engine builds its model with the names registered here, so
the model code stays transformers' own. Both fall back to transformers' implementations outside
the decode case they are written for. Measured on a 2-core CPU (tiny Qwen3-MoE, 64 rows):

* attention, one query per row: two batched matmuls on the key/value heads with the query heads
  of a group stacked, read straight from the in-place cache view (sdpa's CPU kernel costs about
  twice as much at these sizes);
* experts, few tokens: every expert on every token as two batched matmuls, mixed by the routing
  weights (zero for unselected experts). Up to ``DENSE_EXPERT_TOKENS`` tokens this beats sorting
  tokens into per-expert groups; the result equals the sparse computation up to rounding.
"""

from __future__ import annotations

import torch

ATTENTION_NAME = "r1mega_decode"
EXPERTS_NAME = "r1mega_decode"
DENSE_EXPERT_TOKENS = 96
_registered = False


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention-function signature; [B, q, H, Dv] output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None \
            or kwargs.get("output_attentions") or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, KV, g, L]
    scores = scores * (dim ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask.reshape(rows, 1, 1, -1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, KV, g, Dv]
    return out.reshape(rows, 1, heads, value.shape[-1]), None


def decode_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-function signature: [T, H] -> [T, H]."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    tokens = hidden_states.shape[0]
    standard = (getattr(self, "has_gate", True) and not getattr(self, "has_bias", False)
                and not getattr(self, "is_transposed", False) and getattr(self, "is_concatenated", True)
                and not getattr(self, "_is_expert_parallel", False) and not getattr(self, "has_post_expert_norm", False))
    if tokens > DENSE_EXPERT_TOKENS or not standard:
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    gate_up = torch.matmul(hidden_states, self.gate_up_proj.transpose(1, 2))  # [E, T, 2F]
    act = self._apply_gate(gate_up)
    out = torch.matmul(act, self.down_proj.transpose(1, 2))  # [E, T, H]
    weights = hidden_states.new_zeros(tokens, out.shape[0])
    weights.scatter_(1, top_k_index, top_k_weights.to(weights.dtype))
    return (out * weights.t().unsqueeze(-1)).sum(0)


def register() -> bool:
    """Register both kernels with transformers (idempotent); False where transformers lacks the
    extension points (4.x), in which case the engine uses transformers' own."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.integrations.moe import ExpertsInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    ExpertsInterface.register(EXPERTS_NAME, decode_experts)
    _registered = True
    return True
