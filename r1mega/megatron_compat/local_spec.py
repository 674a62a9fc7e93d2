"""Workarounds for megatron-core 0.16.1 without Transformer Engine (its "local" layer spec).

Megatron bugs and gaps hit by *anyone* who runs without Transformer Engine, GPU users included;
:func:`apply_local_spec_workarounds` applies them once per process, and only when megatron's own
probe (:func:`r1mega.megatron_compat.te_probe.megatron_has_te`) says TE is absent. Each patch has a
comment naming the failure it fixes (measured on megatron-core 0.16.1, torch 2.13 CPU build, gloo):

* 5: ``megatron.core.transformer.torch_norm.WrappedTorchNorm`` refuses sequence parallelism, which
  MoE with TP > 1 requires;
* 6: ``megatron.core.transformer.moe.moe_utils`` leaves ``te_general_gemm`` and the fused MoE kernel
  names undefined (NameError in ``RouterGatingLinearFunction``);
* 9: ``megatron.core.transformer.dot_product_attention.DotProductAttention`` rejects the
  ``k_channels``/``v_channels`` MLA passes (TypeError);
* 10: megatron modules set ``HAVE_TE = True`` against a MagicMock ``te`` (TypeError in
  ``MLASelfAttention``);
* 12: ``DotProductAttention`` refuses packed THD batches (AssertionError); computed under the dense
  mask of :func:`r1mega.megatron_compat.masks.thd_causal_mask`.

Guarded by :func:`r1mega.megatron_compat.version.check_megatron_version`.
"""

from __future__ import annotations

import math
import sys

import torch

from r1mega.megatron_compat.applied import is_applied, mark_applied
from r1mega.megatron_compat.masks import thd_causal_mask
from r1mega.megatron_compat.te_probe import megatron_has_te
from r1mega.megatron_compat.version import check_megatron_version


def apply_local_spec_workarounds() -> None:
    """Patches 5, 6, 9, 10 and 12; a no-op when already applied or when Transformer Engine is present."""
    if is_applied("local-spec"):
        return
    check_megatron_version()
    if megatron_has_te():
        mark_applied("local-spec")
        return
    _patch_torch_norm_sequence_parallel()    # 5
    _patch_moe_utils_missing_te_names()      # 6
    _patch_dot_product_attention_channels()  # 9
    _patch_mock_have_te()                    # 10
    _patch_dot_product_attention_thd()       # 12
    mark_applied("local-spec")


def _patch_torch_norm_sequence_parallel() -> None:
    # (5) MoE with TP>1 *requires* sequence_parallel=True (moe_layer.py: "ValueError: During
    #     training, performance may degrade if MoE and tensor parallelism are enabled without also
    #     enabling sequence parallelism"), but the only norm without TE/Apex, WrappedTorchNorm,
    #     refuses it: "AssertionError: sequence parallel not supported by torch LayerNorm".
    #     Fix: build the torch norm under SP as well, and tag its parameters `.sequence_parallel`
    #     as TENorm/FusedLayerNorm do, so that finalize_model_grads all-reduces their gradients
    #     across the TP group.
    import megatron.core.transformer.torch_norm as torch_norm

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch norms"
        assert not config.persist_layer_norm, "persist_layer_norm not supported by torch norms"
        assert not config.memory_efficient_layer_norm, "memory_efficient_layer_norm not supported by torch norms"
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r}: only LayerNorm and RMSNorm are supported")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_moe_utils_missing_te_names() -> None:
    # (6) megatron-core 0.16.1 bug (GPU users without TE too): moe_utils imports te_general_gemm
    #     and the fused_* MoE kernels in a try/except ImportError that does not define them in the
    #     except branch, so RouterGatingLinearFunction.forward's `if te_general_gemm is not None`
    #     raises "NameError: name 'te_general_gemm' is not defined" (moe_utils.py:1192).
    #     Fix: define every missing name as None (what the code already tests for).
    import megatron.core.transformer.moe.moe_utils as moe_utils

    for name in ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss",
                 "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                 "fused_unpermute"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _patch_dot_product_attention_channels() -> None:
    # (9) MLA with the local spec: MLASelfAttention builds its core attention with
    #     k_channels=/v_channels=, which only TEDotProductAttention accepts:
    #     "TypeError: DotProductAttention.__init__() got an unexpected keyword argument
    #     'k_channels' when instantiating MLASelfAttention". The local math already handles
    #     head_dim(q, k) != head_dim(v); only the softmax scale default and the output width
    #     (v_channels * heads per partition) must follow the given channels.
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.__init__

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, k_channels=None,
                 v_channels=None):
        if softmax_scale is None and k_channels is not None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        original(self, config, layer_number, attn_mask_type, attention_type, attention_dropout,
                 softmax_scale, cp_comm_type, pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__


def _patch_dot_product_attention_thd() -> None:
    # (12) Packed sequences in THD layout (PackedSeqParams, qkv_format "thd") reach the local
    #      DotProductAttention as [t, heads, dim] with cu_seqlens: "AssertionError: Packed sequence
    #      is not supported by DotProductAttention. Please use TEDotProductAttention instead."
    #      Fix: the same attention as one batch row of t tokens under the block-diagonal causal
    #      mask of cu_seqlens (r1mega.megatron_compat.masks.thd_causal_mask): what TE's THD kernels
    #      compute, with O(t^2) memory (a CPU and test path, not a fast one).
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.forward

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias,
                            packed_seq_params)
        total = query.shape[0]
        mask = thd_causal_mask(packed_seq_params.cu_seqlens_q, total)
        out = original(self, query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type,
                       attention_bias, None)
        return out.squeeze(1)

    DotProductAttention.forward = forward


def _patch_mock_have_te() -> None:
    # (10) megatron-core 0.16.1 bug without TE: extensions/transformer_engine.py replaces `te` by a
    #      MagicMock when TE is missing, so `from ...extensions.transformer_engine import TELinear`
    #      succeeds in multi_latent_attention.py (and others) and sets their HAVE_TE = True with
    #      TELinear a MagicMock: "TypeError: isinstance() arg 2 must be a type, a tuple of types,
    #      or a union when instantiating MLASelfAttention" (multi_latent_attention.py:185).
    #      Fix: import the modules r1mega builds from, then set HAVE_TE = False in every loaded
    #      megatron module that claims it (megatron's own probe said TE is absent).
    import importlib

    for module_name in ("megatron.core.models.gpt.gpt_layer_specs",  # loads the layer modules
                        "megatron.core.transformer.multi_latent_attention",
                        "megatron.core.transformer.moe.experts", "megatron.core.transformer.moe.moe_layer"):
        importlib.import_module(module_name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(module, "HAVE_TE", None) is True:
            module.HAVE_TE = False
