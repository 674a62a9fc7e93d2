"""megatron-core GPT models built from Hugging Face configs, and streaming HF checkpoint I/O.

    desc = describe_hf_model(hf_dir)                      # typed ModelDesc, or UnsupportedModelError
    parallel = ParallelConfig(tp=2, ep=2)                  # r1mega.parallel
    layout = init_parallel(parallel)                       # checks the world size, sets up groups
    model = build_model(desc, parallel)                    # this rank's GPTModel
    report = load_hf_weights(model, desc, hf_dir)          # each rank reads only its slices
    logits = forward_logits(model, input_ids)              # [B, T, V] on the last stage
    export_hf_weights(model, desc, out_dir, dtypes=report.dtypes)

The trainer's entry point is :func:`load_policy` (r1mega.models.policy): a :class:`Policy` with
log-probs, a GRPO training step, atomic checkpoints loadable in any layout
(r1mega.models.checkpoint) and the HF-named weight stream for rollout engines
(r1mega.models.buckets)::

    policy = load_policy(hf_or_checkpoint_dir, tp=2, ep=2)
    logp = policy.logprobs(input_ids, attention_mask)      # [S, T] on every rank
    metrics = policy.train_step(batch)
    policy.save_checkpoint(run_dir, data_state=sampler.state_dict())
    for bucket in policy.hf_weight_buckets(1 << 30): ...

Only :mod:`r1mega.models.hf_config` is imported eagerly; the rest (which imports megatron) loads
on first use, so that describing or checking a checkpoint stays cheap.

The modules: ``hf_config`` (HF config -> ModelDesc), ``transformer_config`` and ``build`` (the
GPTModel), ``hf_mapping`` (HF <-> megatron tensor names, shapes and shard pieces),
``safetensors_io`` (the file format, streamed), ``hf_checkpoint`` (a HF directory <-> a model in
any layout), ``convert`` (``r1mega convert``), ``policy`` (the trainer's Policy, made of
``sources``, ``batches``, ``runner``, ``optimizer`` and ``export``), ``checkpoint`` (training
checkpoints), ``buckets`` (the weight stream for rollout engines), ``errors`` (CheckpointError).
"""

from __future__ import annotations

import importlib

from r1mega.models.hf_config import (
    SUPPORTED_ARCHS,
    MLADesc,
    ModelDesc,
    MoEDesc,
    RopeDesc,
    UnsupportedModelError,
    describe_hf_config,
    describe_hf_model,
    load_hf_config,
)

_LAZY = {
    "build_model": "r1mega.models.build",
    "forward_logits": "r1mega.models.build",
    "model_config": "r1mega.models.build",
    "make_transformer_config": "r1mega.models.transformer_config",
    "layer_spec": "r1mega.models.transformer_config",
    "transformer_engine_available": "r1mega.models.transformer_config",
    "CheckpointError": "r1mega.models.errors",
    "expected_hf_tensors": "r1mega.models.hf_mapping",
    "scan_hf_checkpoint": "r1mega.models.safetensors_io",
    "LoadReport": "r1mega.models.hf_checkpoint",
    "check_hf_checkpoint": "r1mega.models.hf_checkpoint",
    "export_hf_weights": "r1mega.models.hf_checkpoint",
    "load_hf_weights": "r1mega.models.hf_checkpoint",
    "convert_hf_to_megatron": "r1mega.models.convert",
    "convert_megatron_to_hf": "r1mega.models.convert",
    "convert_hf_to_hf": "r1mega.models.convert",
    "Policy": "r1mega.models.policy",
    "load_policy": "r1mega.models.policy",
    "save_checkpoint": "r1mega.models.checkpoint",
    "load_checkpoint": "r1mega.models.checkpoint",
    "resolve_checkpoint": "r1mega.models.checkpoint",
    "list_checkpoints": "r1mega.models.checkpoint",
    "hf_weight_buckets": "r1mega.models.buckets",
}

__all__ = ["SUPPORTED_ARCHS", "MLADesc", "ModelDesc", "MoEDesc", "RopeDesc", "UnsupportedModelError",  # noqa: PLE0604
           "describe_hf_config", "describe_hf_model", "load_hf_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1mega.models' has no attribute {name!r}")
