"""Rollout engines: generation with the sampler's log-probs, weight refits from the policy's stream,
sleep/wake; the rollout-vs-trainer mismatch metrics; router replay recording.

    from r1mega.rollout import SamplingParams, make_engine

    engine = make_engine("hf", policy.desc.config, tokenizer=tokenizer_dir)
    engine.refit(policy.hf_weight_buckets(64 << 20))
    completions = engine.generate(prompt_token_ids, SamplingParams(n=8, temperature=1.0, seed=0))

Engines: ``hf`` (:mod:`r1mega.rollout.hf_engine`, transformers on CPU or GPU) and ``vllm``
(:mod:`r1mega.rollout.vllm_engine`, GPU only; the one module that imports vLLM). Engine modules
load on first use.
"""

from __future__ import annotations

import importlib

from r1mega.rollout.engine import WAKE_TAGS, Engine, EngineStateError, RefitStats
from r1mega.rollout.mismatch import finish_mismatch, mismatch_metrics, mismatch_sums
from r1mega.rollout.sampling import (
    FINISH_REASONS,
    Completion,
    SamplingParams,
    processed_logits,
    sampled_logprobs,
)

ENGINES = {"hf": ("r1mega.rollout.hf_engine", "HFEngine"), "vllm": ("r1mega.rollout.vllm_engine", "VLLMEngine")}

_LAZY = {
    "HFEngine": "r1mega.rollout.hf_engine",
    "VLLMEngine": "r1mega.rollout.vllm_engine",
    "verify_refit": "r1mega.rollout.refit",
    "Colocation": "r1mega.rollout.refit",
    "build_colocation": "r1mega.rollout.refit",
    "wake_and_refit": "r1mega.rollout.refit",
    "sleep_for_training": "r1mega.rollout.refit",
    "engine_from_config": "r1mega.rollout.refit",
    "sampling_params": "r1mega.rollout.refit",
}

__all__ = ["ENGINES", "FINISH_REASONS", "WAKE_TAGS", "Completion", "Engine", "EngineStateError",  # noqa: PLE0604
           "RefitStats", "SamplingParams", "finish_mismatch", "make_engine", "mismatch_metrics", "mismatch_sums",
           "processed_logits", "sampled_logprobs", *_LAZY]


def make_engine(name: str, model_config, **options) -> Engine:
    """The engine called `name` ("hf" or "vllm") for a model config (see each engine's options)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; one of {', '.join(map(repr, ENGINES))}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls)(model_config, **options)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r1mega.rollout' has no attribute {name!r}")
