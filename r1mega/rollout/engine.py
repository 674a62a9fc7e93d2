"""The one interface the trainer uses to generate: :class:`Engine`, and its state machine.

    engine = make_engine("hf", hf_config_dir, ...)          # r1mega.rollout.make_engine
    stats = engine.refit(policy.hf_weight_buckets(...))      # one pass of the weight stream
    completions = engine.generate(prompt_token_ids, SamplingParams(n=16, temperature=1.0))
    engine.sleep(level=2)                                    # training runs; memory released
    engine.wake_up(["weights"]); engine.refit(...); engine.wake_up(["kv_cache"])
    engine.close()

States (checked by every call; a call in the wrong state raises :class:`EngineStateError` that
says what to call first):

* ``weights`` and ``kv_cache`` are each awake or asleep. ``sleep(level)`` puts both to sleep:
  level 1 keeps the weights (offloaded where the engine can), level 2 drops them, so the next
  wake must be followed by a full refit before generating (vLLM returns garbage otherwise).
* ``wake_up(tags)`` wakes ``"weights"`` and/or ``"kv_cache"``; the weights must be awake before
  the KV cache (the order that keeps old weights, new weights and the cache from coexisting on
  the device: wake weights -> refit -> wake the KV cache).
* ``load_weights`` needs the weights awake (the KV cache may sleep); ``generate`` needs both
  awake and current weights: every tensor loaded since the engine was built or its weights
  dropped (a missing tensor is named).
* ``close()`` ends the engine; any later call but ``close`` raises.

Subclasses implement the ``_``-prefixed hooks; the bookkeeping here is shared, so the state
machine and the refit protocol are the same, and tested the same, for every engine.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from r1mega.rollout.sampling import Completion, SamplingParams

WAKE_TAGS = ("weights", "kv_cache")


class EngineStateError(RuntimeError):
    """A call the engine cannot take in its current state; the message says what to do."""


@dataclass(frozen=True)
class RefitStats:
    """One pass of the weight stream into an engine."""

    tensors: int
    bytes: int
    buckets: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


class Engine(ABC):
    """A rollout engine: generation with the sampler's log-probs, weight refits, sleep/wake."""

    name: ClassVar[str]

    def __init__(self, expected_weights: Iterable[str]):
        self._expected = frozenset(expected_weights)
        self._loaded: set[str] = set()
        self._weights_awake = True
        self._kv_awake = True
        self._weights_dropped = False
        self._closed = False
        self._abort = threading.Event()
        self.refits = 0

    # ---- state ----------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, object]:
        """weights / kv_cache: "awake" or "asleep"; current: every weight loaded; closed."""
        return {"weights": "awake" if self._weights_awake else "asleep",
                "kv_cache": "awake" if self._kv_awake else "asleep",
                "current": not self.missing_weights(), "closed": self._closed}

    @property
    def expected_weights(self) -> frozenset[str]:
        """The Hugging Face tensor names a complete refit delivers."""
        return self._expected

    def missing_weights(self) -> list[str]:
        """Expected tensors not loaded since the engine was built or its weights were dropped."""
        return sorted(self._expected - self._loaded)

    def _require_open(self, what: str) -> None:
        if self._closed:
            raise EngineStateError(f"{self.name} engine: {what} after close(); build a new engine")

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams, *,
                 first_prompt_index: int = 0) -> list[Completion]:
        """params.n completions of every prompt, prompt-major (all of prompt 0, then prompt 1, ...).

        Prompt i of this call counts as prompt ``first_prompt_index + i`` (its completions'
        ``prompt_index`` and, with a seed, their random streams), so a batch split over several
        engines samples what one engine would."""
        if isinstance(first_prompt_index, bool) or not isinstance(first_prompt_index, int) or first_prompt_index < 0:
            raise ValueError(f"generate: first_prompt_index must be an int >= 0, got {first_prompt_index!r}")
        self._require_open("generate")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be r1mega.rollout.SamplingParams, got {type(params).__name__}")
        if not self._weights_awake or not self._kv_awake:
            asleep = [t for t, awake in (("weights", self._weights_awake), ("kv_cache", self._kv_awake)) if not awake]
            raise EngineStateError(f"{self.name} engine: generate while {' and '.join(asleep)} sleep; call "
                                   f"wake_up({asleep!r}) first (weights, then refit, then kv_cache)")
        missing = self.missing_weights()
        if missing:
            why = "its weights were dropped by sleep(level=2)" if self._weights_dropped else "it was built"
            raise EngineStateError(f"{self.name} engine: generate before a complete refit: {len(missing)} of "
                                   f"{len(self._expected)} tensors not loaded since {why} (first: {missing[0]!r}); "
                                   "pass the whole weight stream to refit() or load_weights()")
        self._abort.clear()
        return self._generate(prompt_token_ids, params, first_prompt_index)

    def abort(self) -> None:
        """Ask a generate call running in another thread to stop: its unfinished completions end
        with finish reason "abort" (the tokens so far are kept)."""
        self._abort.set()

    # ---- weights --------------------------------------------------------------------------
    def load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Load (Hugging Face name, full tensor) pairs, e.g. one bucket of the weight stream;
        returns the bytes loaded. Names must be expected tensors; shapes are checked."""
        self._require_awake_weights("load_weights")
        self._check_names(bucket)
        nbytes = self._load_weights(bucket)
        self._loaded.update(name for name, _ in bucket)
        return nbytes

    def refit(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], *, allow_partial: bool = False) -> RefitStats:
        """One pass of a weight stream (e.g. ``policy.hf_weight_buckets(n)``) into the engine.

        Every expected tensor must arrive exactly once (``allow_partial`` allows a subset), else
        a ValueError names the first missing or repeated one. Afterwards the prefix cache is
        reset, so no cached state of the old weights survives.
        """
        self._require_awake_weights("refit")
        start = time.perf_counter()
        seen: set[str] = set()
        totals = {"bytes": 0, "buckets": 0}

        def tracked():
            for bucket in buckets:
                self._check_names(bucket)
                for name, tensor in bucket:
                    if name in seen:
                        raise ValueError(f"{self.name} engine: refit got {name!r} twice in one pass of the stream")
                    seen.add(name)
                    totals["bytes"] += tensor.numel() * tensor.element_size()
                totals["buckets"] += 1
                yield bucket

        self._refit_stream(tracked())
        self._loaded.update(seen)
        missing = sorted(self._expected - seen)
        if missing and not allow_partial:
            raise ValueError(f"{self.name} engine: the refit stream lacked {len(missing)} tensors "
                             f"(first: {missing[0]!r})")
        self.reset_prefix_cache()
        self.refits += 1
        return RefitStats(tensors=len(seen), bytes=totals["bytes"], buckets=totals["buckets"],
                          seconds=time.perf_counter() - start)

    def _require_awake_weights(self, what: str) -> None:
        self._require_open(what)
        if not self._weights_awake:
            raise EngineStateError(f"{self.name} engine: {what} while the weights sleep; call "
                                   "wake_up(['weights']) first")

    def _check_names(self, bucket) -> None:
        unknown = [n for n, _ in bucket if n not in self._expected]
        if unknown:
            raise KeyError(f"{self.name} engine: got tensor {unknown[0]!r}, which this model does not have")

    def held_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) of what the engine holds, for verifying a refit
        (:func:`r1mega.rollout.verify_refit`). Engines that keep weights in another layout yield
        what they can reconstruct."""
        self._require_open("held_weights")
        if not self._weights_awake:
            raise EngineStateError(f"{self.name} engine: held_weights while the weights sleep")
        return self._held_weights()

    def verify_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> list[str]:
        """Names of tensors in `buckets` (a pass of the weight stream) that the engine does not hold
        exactly (cast to the engine's dtype), and of expected tensors the pass lacked."""
        held = dict(self.held_weights())
        bad, seen = [], set()
        for bucket in buckets:
            for name, tensor in bucket:
                seen.add(name)
                mine = held.get(name)
                if mine is None or mine.shape != tensor.shape or \
                        not torch.equal(mine, tensor.to(device=mine.device, dtype=mine.dtype)):
                    bad.append(name)
        return bad + sorted(self._expected - seen)

    # ---- memory ---------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Release memory: the KV cache always; level 1 offloads the weights, level 2 drops them."""
        self._require_open("sleep")
        if level not in (1, 2):
            raise ValueError(f"{self.name} engine: sleep level must be 1 or 2, got {level!r}")
        if not (self._weights_awake and self._kv_awake):
            raise EngineStateError(f"{self.name} engine: sleep while already (partly) asleep; call wake_up() first")
        self._sleep(level)
        self._weights_awake = self._kv_awake = False
        if level == 2:
            self._loaded.clear()
            self._weights_dropped = True

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Restore the weights and/or the KV cache (default both, weights first)."""
        self._require_open("wake_up")
        tags = list(WAKE_TAGS if tags is None else ([tags] if isinstance(tags, str) else tags))
        bad = [t for t in tags if t not in WAKE_TAGS]
        if bad or not tags:
            raise ValueError(f"{self.name} engine: wake_up tags must be among {WAKE_TAGS}, got {tags!r}")
        if "weights" in tags and self._weights_awake:
            raise EngineStateError(f"{self.name} engine: wake_up(['weights']) while the weights are awake")
        if "kv_cache" in tags and self._kv_awake:
            raise EngineStateError(f"{self.name} engine: wake_up(['kv_cache']) while the KV cache is awake")
        if "kv_cache" in tags and not self._weights_awake and "weights" not in tags:
            raise EngineStateError(f"{self.name} engine: wake the weights before the KV cache "
                                   "(wake_up(['weights']), refit, then wake_up(['kv_cache']))")
        if "weights" in tags:
            self._wake_weights()
            self._weights_awake = True
        if "kv_cache" in tags:
            self._wake_kv_cache()
            self._kv_awake = True

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt state (called by refit; after any weight change)."""
        self._require_open("reset_prefix_cache")
        self._reset_prefix_cache()

    def close(self) -> None:
        """Release everything; idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                  first_prompt_index: int) -> list[Completion]: ...

    @abstractmethod
    def _load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int: ...

    @abstractmethod
    def _held_weights(self) -> Iterable[tuple[str, torch.Tensor]]: ...

    def _refit_stream(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> None:
        """Load one pass of the stream; engines with a reload protocol of their own (vLLM's
        layerwise reload, which re-quantises) override this."""
        for bucket in buckets:
            self._load_weights(bucket)

    @abstractmethod
    def _sleep(self, level: int) -> None: ...

    @abstractmethod
    def _wake_weights(self) -> None: ...

    def _wake_kv_cache(self) -> None:
        """Reallocate the KV cache (engines that allocate it per call have nothing to do)."""

    def _reset_prefix_cache(self) -> None:
        """Engines without a prefix cache have nothing to do."""

    def _close(self) -> None:
        """Release resources."""
