"""The one place where megatron's TransformerConfig and the layer spec are chosen.

:func:`make_transformer_config` turns a :class:`~r1mega.models.hf_config.ModelDesc` and a
:class:`~r1mega.parallel.state.ParallelConfig` into megatron's ``TransformerConfig`` (or
``MLATransformerConfig`` for DeepSeek-V3) with every field that affects numerics set explicitly;
:func:`layer_spec` picks megatron's Transformer Engine spec on a GPU with Transformer Engine and its
local spec otherwise (CPU, or GPU without TE); grouped-GEMM experts (``policy.grouped_gemm``) are
TE's ``GroupedLinear`` with TE and :mod:`r1mega.models.grouped_experts` without, in one parameter
layout. FP8 (``policy.fp8`` and its recipe knobs) is set here too, and only here. No other r1mega module chooses between them, and no
r1mega module imports transformer_engine: :func:`transformer_engine_available` reads megatron's own
probe, ``megatron.core.extensions.transformer_engine.HAVE_TE``.

Numerics that must match the Hugging Face implementations:

* no dropout, SwiGLU MLPs, RMSNorm, no linear biases (Qwen2's q/k/v biases via ``add_qkv_bias``),
  attention softmax in fp32;
* MoE: no capacity (no token is dropped), no aux loss by default, router score function and
  normalisation as the family defines them (see ``ModelDesc.moe``), router logits in fp32 for
  DeepSeek-V3 (as transformers computes them);
* DeepSeek-V3 MLA: ``qk_layernorm=True`` builds the q_a/kv_a RMSNorms; RoPE on interleaved pairs is
  megatron's MLA default; YaRN through ``rope_type="yarn"``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from r1mega.config import ConfigError, PolicyConfig
from r1mega.megatron_compat import megatron_has_te
from r1mega.models.grouped_experts import use_grouped_experts
from r1mega.models.hf_config import ModelDesc
from r1mega.parallel.state import ParallelConfig

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ModelDesc dtype name."""
    return _TORCH_DTYPES[name]


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when megatron can build Transformer Engine layers here (a CUDA device and TE)."""
    if not torch.cuda.is_available():
        return False

    return megatron_has_te()


def make_transformer_config(desc: ModelDesc, parallel: ParallelConfig, *, dtype: Optional[str] = None,
                            policy: Optional[PolicyConfig] = None, **overrides):
    """megatron's TransformerConfig for `desc` under `parallel`.

    `dtype` is the parameter dtype (default: the checkpoint's, ``desc.dtype``). `policy` (default
    :class:`~r1mega.config.PolicyConfig`) chooses grouped-GEMM experts and FP8: FP8 needs
    Transformer Engine on a CUDA device and is refused in one line (ConfigError) elsewhere. `overrides` are
    passed to the config as-is (e.g. ``moe_aux_loss_coeff``, ``recompute_granularity``) for the
    trainer; they are not needed for a forward pass that matches the Hugging Face model.
    """
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    parallel.check_model(num_layers=desc.num_layers, moe=desc.is_moe)
    policy = policy or PolicyConfig()
    params_dtype = torch_dtype(dtype or desc.dtype)
    use_te = transformer_engine_available()
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        # size
        num_layers=desc.num_layers, hidden_size=desc.hidden_size, num_attention_heads=desc.num_heads,
        num_query_groups=desc.num_kv_heads, kv_channels=desc.head_dim, ffn_hidden_size=desc.ffn_hidden_size,
        # numerics
        normalization="RMSNorm", layernorm_epsilon=desc.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=desc.qkv_bias,
        qk_layernorm=desc.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        attention_softmax_in_fp32=True, apply_query_key_layer_scaling=False,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        init_method_std=desc.init_std, perform_initialization=True,
        # parallelism
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep, expert_tensor_parallel_size=parallel.expert_tp,
        sequence_parallel=parallel.uses_sequence_parallel,
        pipeline_dtype=params_dtype if parallel.pp > 1 else None,
        num_layers_in_first_pipeline_stage=parallel.pp_first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.pp_last_stage_layers,
        # kernels: fusions need TE/Apex/CUDA; the local path keeps plain torch ops
        use_cpu_initialization=on_cpu, gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, attention_backend=AttnBackend.auto if use_te else AttnBackend.local,
    )
    if desc.moe is not None:
        moe = desc.moe
        kwargs.update(
            num_moe_experts=moe.num_experts, moe_router_topk=moe.topk, moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_layer_freq=[int(is_moe) for is_moe in moe.layers],
            moe_shared_expert_intermediate_size=moe.shared_ffn_hidden_size or None,
            moe_router_score_function=moe.score_function, moe_router_pre_softmax=moe.pre_softmax,
            moe_router_enable_expert_bias=moe.expert_bias, moe_router_num_groups=moe.num_groups,
            moe_router_group_topk=moe.group_topk, moe_router_topk_scaling_factor=moe.scaling_factor,
            moe_router_dtype="fp32" if moe.router_fp32 else None,
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_expert_capacity_factor=None, moe_token_dispatcher_type=parallel.moe_dispatcher,
            moe_grouped_gemm=policy.grouped_gemm, moe_permute_fusion=False, moe_router_fusion=False,
            moe_shared_expert_overlap=False,
        )
    kwargs.update(fp8_config(policy, use_te))
    # rotate-half RoPE (transformers' layout). MLA de-interleaves its rope dims before rotating
    # (megatron's multi_latent_attention path), which is DeepSeek's rope_interleave=True layout.
    kwargs.update(rotary_interleaved=False)
    if desc.mla is not None:
        mla, rope = desc.mla, desc.rope
        kwargs.update(
            multi_latent_attention=True, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
            qk_head_dim=mla.qk_nope_head_dim, qk_pos_emb_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim, rotary_base=rope.theta, rotary_percent=1.0,
            rope_type="yarn" if rope.kind == "yarn" else "rope",
        )
        if rope.kind == "yarn":
            kwargs.update(rotary_scaling_factor=rope.factor,
                          original_max_position_embeddings=rope.original_max_position_embeddings,
                          beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, mscale=rope.mscale,
                          mscale_all_dim=rope.mscale_all_dim)
        else:  # makes MLA's softmax scale exactly 1/sqrt(qk_head_dim)
            kwargs.update(rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
        kwargs.update(overrides)
        return MLATransformerConfig(**kwargs)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def fp8_config(policy: PolicyConfig, use_te: bool) -> dict:
    """The TransformerConfig fields of `policy`'s FP8 choice (empty without FP8); ConfigError when
    FP8 is asked for where Transformer Engine cannot run it (`use_te` False)."""
    if policy.fp8 is None:
        return {}
    if not use_te:
        where = "no CUDA device" if not torch.cuda.is_available() else "CUDA but no Transformer Engine"
        raise ConfigError(f"policy.fp8: {policy.fp8!r} needs Transformer Engine on a CUDA GPU and this machine has "
                          f"{where}; install it (pip install -e '.[gpu]') or set policy.fp8=none")
    fields = dict(fp8=policy.fp8, fp8_recipe=policy.fp8_recipe, fp8_margin=policy.fp8_margin)
    if policy.fp8_recipe == "delayed":
        fields.update(fp8_amax_history_len=policy.fp8_amax_history_len,
                      fp8_amax_compute_algo=policy.fp8_amax_compute_algo)
    return fields


def rope_model_kwargs(desc: ModelDesc) -> dict:
    """The GPTModel keyword arguments for rotary embeddings (MLA keeps its own, in the config)."""
    rope = desc.rope
    if desc.mla is not None:
        return {"position_embedding_type": "rope"}
    kwargs = {"position_embedding_type": "rope", "rotary_base": rope.theta, "rotary_percent": 1.0}
    if rope.kind == "linear":
        kwargs["seq_len_interpolation_factor"] = rope.factor
    elif rope.kind == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=rope.factor)
    return kwargs


def layer_spec(config, *, pp_rank: Optional[int] = None, vp_stage: Optional[int] = None):
    """The decoder block spec for this machine: Transformer Engine layers or megatron's local ones.

    Per-layer dense/MoE choice follows ``config.moe_layer_freq``; the slice for this pipeline
    stage is taken by megatron from `pp_rank` (default: the current rank).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = transformer_engine_available()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                      vp_stage=vp_stage, pp_rank=pp_rank)
    if config.moe_grouped_gemm and not use_te:
        # megatron's local provider would pick its legacy GroupedMLP (CUDA grouped_gemm, bf16 only, a
        # fused weight buffer); TE's TEGroupedMLP layout with torch grouped linears keeps one layout.
        use_grouped_experts(spec)
    return spec
