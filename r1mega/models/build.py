"""megatron-core GPTModels from a :class:`~r1mega.models.hf_config.ModelDesc`, for the current layout.

:func:`build_model` builds this rank's part of the model (its pipeline stage, its TP shard, its
experts) for the process groups :func:`r1mega.parallel.state.init_parallel` set up;
:func:`forward_logits` runs a forward pass through megatron's forward-backward schedule (so it
works with pipeline parallelism) and returns full-vocabulary logits on the last stage. Weights
come from :func:`r1mega.models.hf_checkpoint.load_hf_weights`.
"""

from __future__ import annotations

from typing import Optional

import torch

from r1mega.config import ConfigError
from r1mega.megatron_compat import fix_mla_rope_key_grad
from r1mega.models.hf_config import ModelDesc
from r1mega.models.transformer_config import (
    layer_spec,
    make_transformer_config,
    rope_model_kwargs,
)
from r1mega.parallel.state import ParallelConfig


def check_model_split(desc: ModelDesc, parallel: ParallelConfig) -> None:
    """Raise ConfigError unless `parallel` can shard `desc`: the vocabulary and the attention
    (key/value heads; MLA: all heads) over tp, the routed experts over ep. The layer split over
    pp is ``parallel.check_model``'s."""
    if desc.vocab_size % parallel.tp:
        raise ConfigError(f"parallel.tp: {parallel.tp} does not divide the vocabulary size {desc.vocab_size}")
    if desc.moe is not None and desc.moe.num_experts % parallel.ep:
        raise ConfigError(f"parallel.ep: {parallel.ep} does not divide the {desc.moe.num_experts} experts")
    heads_split = desc.num_kv_heads if desc.mla is None else desc.num_heads
    if heads_split % parallel.tp:
        raise ConfigError(f"parallel.tp: {parallel.tp} does not divide the {heads_split} "
                          f"{'key/value' if desc.mla is None else 'attention'} heads")


def build_model(desc: ModelDesc, parallel: ParallelConfig, *, dtype: Optional[str] = None, **config_overrides):
    """This rank's GPTModel for `desc`, randomly initialised; megatron's groups must match `parallel`.

    `dtype` is the parameter dtype (default ``desc.dtype``) of every parameter; DeepSeek-V3's expert
    bias (a buffer) stays fp32 as megatron keeps it. The model is in eval mode. The
    initialisation is never skipped: megatron tags tensor-parallel parameters
    (``tensor_model_parallel``, ``partition_dim``) only while initialising them, and gradient
    clipping and the checkpoint converter rely on those tags.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model: call r1mega.parallel.init_parallel first")
    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size())
    if sizes != (parallel.tp, parallel.pp, parallel.ep):
        raise ConfigError(f"parallel: the process groups are tp/pp/ep={sizes}, the config says "
                          f"{(parallel.tp, parallel.pp, parallel.ep)}; call init_parallel with this config")
    check_model_split(desc, parallel)
    config = make_transformer_config(desc, parallel, dtype=dtype, **config_overrides)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, pp_rank=pp_rank),
        vocab_size=desc.vocab_size,
        max_sequence_length=desc.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=desc.tie_embeddings,
        **rope_model_kwargs(desc),
    )
    if desc.mla is not None and parallel.tp > 1:
        fix_mla_rope_key_grad(model)  # megatron-core 0.16.1: MLA's rope-key gradient with tp > 1
    if config.params_dtype != torch.float32:
        # As megatron's Float16Module does: modules built outside megatron's linear layers (the
        # torch norms of the local spec) are created in fp32. The router's expert bias stays fp32.
        model.to(config.params_dtype)
        for module in model.modules():
            if hasattr(module, "_maintain_float32_expert_bias"):
                module._maintain_float32_expert_bias()
    model.eval()
    return model


def unwrap_model(model):
    """The GPTModel inside megatron/torch wrappers (DDP, Float16Module), which add ``module.``."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def model_config(model):
    """The TransformerConfig a model (or a DDP/Float16 wrapper of one) was built with."""
    from megatron.core.utils import get_model_config

    return get_model_config(model)


@torch.no_grad()
def forward_logits(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [B, T, V] of one batch on the last pipeline stage, None elsewhere.

    Every rank of the model-parallel group calls it with the same `input_ids` [B, T]. Runs
    megatron's forward-only schedule with one micro-batch; logits are gathered over TP in fp32.
    The sequence length must be a multiple of tp when sequence parallelism is on.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    config = model_config(model)
    batch, seq = input_ids.shape
    if config.sequence_parallel and seq % config.tensor_model_parallel_size:
        raise ValueError(f"input_ids: sequence length {seq} must be a multiple of tp="
                         f"{config.tensor_model_parallel_size} under sequence parallelism")
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    captured: list[torch.Tensor] = []

    def loss_func(output):
        captured.append(gather_from_tensor_model_parallel_region(output.float()))
        return output.new_zeros(()), {}

    def forward_step(data_iterator, step_model):
        ids, pos = next(data_iterator)
        return step_model(ids, pos, None), loss_func

    was_training = model.training
    model.eval()
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(input_ids, position_ids)]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True)
    finally:
        model.train(was_training)
    return captured[0] if ps.is_pipeline_last_stage() else None
