"""megatron-core 0.16.1's multi-latent attention
(``megatron.core.transformer.multi_latent_attention.MLASelfAttention``) with tp > 1 on the local
spec: the gradient of the shared rope key.

The local spec builds ``linear_kv_down_proj`` as a ``ColumnParallelLinear``; MLASelfAttention then
all-gathers its output over TP with a backward that only splits the gradient, so each rank's
``k_pos_emb`` gradient is partial and never summed: the forward is exact, the gradients below are
wrong. :func:`fix_mla_rope_key_grad` fixes it on one model's attention layers (GPU without
Transformer Engine too).
"""

from __future__ import annotations

import torch

from r1mega.megatron_compat.version import megatron_version_matches


class _SumTrailingGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces ``grad[..., start:]`` over `group` (the rest as is)."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


def fix_mla_rope_key_grad(model) -> None:
    """megatron-core 0.16.1 bug, MLA with tp > 1 on the local spec (GPU without TE too).

    The local spec builds linear_kv_down_proj as a ColumnParallelLinear; MLASelfAttention then
    all-gathers its output over TP (gather_from_tensor_model_parallel_region, whose backward only
    SPLITS the gradient) and feeds the rope part, k_pos_emb, to every rank's own heads. Each rank's
    k_pos_emb gradient is therefore partial and is never summed over TP: the forward is exact
    but the gradients of linear_kv_down_proj (and everything below) are wrong (measured: TP2 grad
    norm 6.2185 vs TP1 6.2456 on the tiny DeepSeek-V3; the loss then drifts). Transformer
    Engine's spec avoids it with a duplicated kv_down projection, whose k_pos_emb is gathered over
    the sequence-parallel region (backward: reduce-scatter, a sum).

    Fix, on this model's attention layers: return the down projection already gathered over TP
    (in the sequence-parallel layout under SP), which sends MLA down its "duplicated" branch; that
    branch sums k_pos_emb's gradient under SP, and without SP the rope slice's gradient is
    all-reduced here. Forward values are unchanged.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        gather_from_tensor_model_parallel_region,
        scatter_to_sequence_parallel_region,
    )
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if not megatron_version_matches():
        return
    for module in model.modules():
        if not (isinstance(module, MLASelfAttention) and isinstance(module.linear_kv_down_proj, ColumnParallelLinear)):
            continue
        proj, config = module.linear_kv_down_proj, module.config

        def forward(hidden_states, *args, _original=proj.forward, _config=config, **kwargs):
            out, bias = _original(hidden_states, *args, **kwargs)  # [s, b, (kv_lora + rope) / tp]
            full = gather_from_tensor_model_parallel_region(out)  # [s, b, kv_lora + rope]
            if _config.sequence_parallel:
                return scatter_to_sequence_parallel_region(full), bias  # [s / tp, b, kv_lora + rope]
            return _SumTrailingGrad.apply(full, _config.kv_lora_rank, ps.get_tensor_model_parallel_group()), bias

        proj.forward = forward
