"""The ``vllm`` engine: vLLM colocated with the trainer in the torchrun ranks (GPU only).

The one module that imports vLLM, written against vLLM 0.32.0 (the release built for torch 2.13;
every call below was read from its sources, file and line noted where it matters):

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

from r1mega.models.hf_config import describe_hf_model
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


def llm_kwargs(config_dir: str, *, tp: int, dtype: torch.dtype, seed: int, gpu_memory_utilization: float,
               max_model_len: Optional[int], fp8: bool, return_routes: bool, has_tokenizer: bool,
               expert_parallel: bool) -> dict[str, Any]:
    """The ``vllm.LLM`` keywords of a colocated engine."""
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    if dtype not in names:
        raise ValueError(f"vllm engine: dtype must be one of {list(names)}, got {dtype!r}")
    kwargs = dict(model=str(config_dir), tensor_parallel_size=tp, dtype=names[dtype], seed=seed,
                  distributed_executor_backend="external_launcher", enable_sleep_mode=True, load_format="dummy",
                  skip_tokenizer_init=not has_tokenizer, logprobs_mode="processed_logprobs",
                  gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                  enable_expert_parallel=expert_parallel, max_logprobs=0)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if fp8:
        kwargs["quantization"] = "fp8_per_block"
    if return_routes:
        kwargs["enable_return_routed_experts"] = True
    return kwargs


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


class VLLMEngine(Engine):
    """Colocated vLLM; build it on every rank of the torchrun job at the same time."""

    name = "vllm"

    def __init__(self, model_config: Any, *, tokenizer: Any = None, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, tp: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: Optional[int] = None, fp8: bool = False, return_routes: bool = False,
                 expert_parallel: bool = False):
        """`model_config`: a model directory with config.json (the policy's ``side_files``: no
        weights are read from it). `tokenizer`: a directory (stop strings); `tp`: vLLM's tensor
        parallel size (a divisor of the world size); `fp8`: online blockwise FP8."""
        import torch.distributed as dist

        try:
            import vllm
        except ImportError:
            raise RuntimeError("vllm engine: vLLM is not installed (on a CUDA machine: pip install -e '.[gpu]'); "
                               "use rollout.engine=hf without it") from None

        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            raise RuntimeError(f"vllm engine: written for vLLM {SUPPORTED_VLLM}.x, found {vllm.__version__}")
        if not torch.cuda.is_available():
            raise RuntimeError("vllm engine: needs CUDA; use rollout.engine=hf on this machine")
        if not isinstance(model_config, (str, Path)) or not (Path(model_config) / "config.json").is_file():
            raise ValueError("vllm engine: model_config must be a directory holding config.json")
        if dist.is_initialized() and dist.get_world_size() % tp:
            raise ValueError(f"vllm engine: tp={tp} does not divide the world size {dist.get_world_size()}")
        self.desc = describe_hf_model(model_config)
        super().__init__(expected_hf_tensors(self.desc))
        if return_routes and not self.desc.is_moe:
            raise ValueError(f"vllm engine: return_routes needs an MoE model; {self.desc.arch} has no experts")
        self.tokenizer_dir = tokenizer
        self.moe_layers = tuple(i for i in range(self.desc.num_layers) if self.desc.is_moe_layer(i))
        self.return_routes = return_routes
        self.eos_token_ids = self._eos_ids(Path(model_config))
        kwargs = llm_kwargs(str(model_config), tp=tp, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, fp8=fp8,
                            return_routes=return_routes, has_tokenizer=tokenizer is not None,
                            expert_parallel=expert_parallel and self.desc.is_moe)
        if tokenizer is not None:
            kwargs["tokenizer"] = str(tokenizer)
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

        def reload(worker, stream):  # runs in this process, on the vLLM worker
            worker.reload_weights(weights_iterator=stream, is_checkpoint_format=True)

        self.llm.collective_rpc(reload, args=(weights(),))

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

    def _sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def _wake_weights(self) -> None:
        self.llm.wake_up(tags=["weights"])

    def _wake_kv_cache(self) -> None:
        self.llm.wake_up(tags=["kv_cache"])

    def _reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _close(self) -> None:
        self.llm = None
