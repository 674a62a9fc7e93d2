"""megatron-core 0.16.1's MoE router, ``megatron.core.transformer.moe.router.TopKRouter``: the
expert-bias update under a padding mask.

``TopKRouter._apply_expert_bias`` masks the [N, E] routing map with the flattened [N] padding mask,
``routing_map & (~padding_mask)``, which fails unless N == E (any device, TE or not).
:func:`fix_expert_bias_padding` replaces it on one model's routers only (never the class).
"""

from __future__ import annotations

import torch

from r1mega.megatron_compat.version import megatron_version_matches


def fix_expert_bias_padding(model) -> None:
    """Patch the expert-bias update of every TopKRouter of `model` that keeps an expert bias; a
    no-op on a megatron-core other than the version the fix was written for."""
    # megatron-core 0.16.1 bug (any device): TopKRouter._apply_expert_bias masks the [N, E]
    # routing map with the flattened [N] padding mask, `routing_map & (~padding_mask)`, which
    # fails unless N == E: "RuntimeError: The size of tensor a (8) must match the size of tensor b
    # (24) at non-singleton dimension 1" (router.py:542). Fix, on this model's routers only: the
    # same update with the mask broadcast over experts. Written for 0.16.1 (the shim's version).
    from megatron.core.transformer.moe.router import TopKRouter

    if not megatron_version_matches():
        return
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.enable_expert_bias:
            def apply_expert_bias(routing_map, padding_mask=None, router=module):
                if router.enable_expert_bias and torch.is_grad_enabled():
                    with torch.no_grad():
                        if padding_mask is not None:
                            routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                        router.local_tokens_per_expert += routing_map.sum(dim=0)

            module._apply_expert_bias = apply_expert_bias
