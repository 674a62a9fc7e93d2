"""Deterministic, resumable batches of prompts across epochs.

Epoch ``e`` visits the dataset in one permutation that depends only on ``(seed, e, len(dataset))``:
every index gets a 64-bit key from SplitMix64 over ``(seed, e, index)`` and the permutation sorts
the keys. The mixing is written out here in NumPy integer arithmetic, so the order does not change
with the NumPy, torch or Python version (a pinned test guards it), and is cheap to recompute.

The sampler's whole state is ``(epoch, position)``: ``position`` counts the prompts of the epoch's
permutation already handed out. `state_dict()` after step k and `load_state_dict()` into a fresh
sampler continue with exactly the batches an uninterrupted run yields from step k + 1.

Batches are global: ``batch_size`` prompts per step over all data-parallel ranks, and rank r of
``world_size`` gets the r-th contiguous slice of each global batch. Every rank therefore holds the
same state, the prompt order does not depend on the world size, and a run may resume on a different
number of ranks. (It may also resume with another ``batch_size``: with ``drop_last=False`` the
prompts come in the same order, cut into batches differently.)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_STATE_VERSION = 1


def _mix_int(x: int) -> int:
    """SplitMix64's finaliser on a Python int (mod 2**64)."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrap-around arithmetic, like `_mix_int`)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order (int64 indices) in which epoch `epoch` of a sampler with `seed` visits n items."""
    base = _mix_int(_mix_int(_mix_int(seed & _MASK) ^ (epoch & _MASK)) ^ 0x5231_6D65_6761)  # "R1mega"
    keys = _mix_array(np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN))
    return np.argsort(keys, kind="stable")


class PromptSampler(Generic[T]):
    """An endless (or `max_epochs`-long) iterator of batches of records, or of indices.

    records_or_len: the records to batch, or the dataset size (then batches hold indices).
    batch_size: prompts per step over all ranks; must be a multiple of world_size.
    seed: shuffling seed (>= 0). shuffle=False visits every epoch in index order.
    drop_last: True (the default, uniform GRPO steps) drops the n % batch_size prompts left at
        the end of each epoch (a different set every epoch); False yields them as a short last
        batch, shared out as evenly as possible (some ranks may get one fewer, or none).
    rank, world_size: this rank's contiguous slice of each global batch.
    max_epochs: stop after that many epochs; None iterates forever.

    `epoch` and `position` say where the next batch starts; `state_dict()` saves them.
    """

    def __init__(self, records_or_len: Sequence[T] | int, *, batch_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 max_epochs: int | None = None) -> None:
        if isinstance(records_or_len, bool):
            raise ValueError("records_or_len: expected a sequence of records or a length, got bool")
        if isinstance(records_or_len, numbers.Integral):
            self._records: Sequence[T] | None = None
            self.num_records = int(records_or_len)
        else:
            self._records = records_or_len
            self.num_records = len(records_or_len)
        for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: {value!r} must be an integer >= {low}")
        if self.num_records < 1:
            raise ValueError("records_or_len: the dataset is empty")
        if rank >= world_size:
            raise ValueError(f"rank: {rank} must be < world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size: {batch_size} is not a multiple of world_size {world_size}")
        if drop_last and batch_size > self.num_records:
            raise ValueError(f"batch_size: {batch_size} exceeds the {self.num_records} records "
                             "(with drop_last=True no batch would ever be full)")
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 0):
            raise ValueError(f"max_epochs: {max_epochs!r} must be None or an integer >= 0")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.epoch = 0
        self.position = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def epoch_length(self) -> int:
        """Prompts handed out per epoch (the dataset, less the dropped tail)."""
        if self.drop_last:
            return self.num_records - self.num_records % self.batch_size
        return self.num_records

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.epoch_length // self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The full visiting order of `epoch` (before the tail is dropped)."""
        if not self.shuffle:
            return np.arange(self.num_records)
        if self._perm_epoch != epoch:
            self._perm = epoch_permutation(self.num_records, seed=self.seed, epoch=epoch)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's indices of the next batch, advancing the state; StopIteration at the end."""
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        end = min(self.position + self.batch_size, self.epoch_length)
        batch = self.permutation(self.epoch)[self.position:end]
        self.position = end
        if self.position >= self.epoch_length:
            self.epoch += 1
            self.position = 0
        per, extra = divmod(len(batch), self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return batch[start:start + per + (self.rank < extra)].tolist()

    def __iter__(self) -> PromptSampler[T]:
        return self

    def __next__(self) -> list[T]:
        indices = self.next_indices()
        if self._records is None:
            return indices  # type: ignore[return-value]
        return [self._records[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable resume state; identical on every rank."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "seed": self.seed, "num_records": self.num_records, "shuffle": self.shuffle,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state from another seed, dataset size or mode."""
        if not isinstance(state, dict):
            raise ValueError(f"sampler state: expected a dict, got {type(state).__name__}")
        for key in ("version", "epoch", "position", "seed", "num_records", "shuffle", "drop_last"):
            if key not in state:
                raise ValueError(f"sampler state: {key!r} missing")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"sampler state: 'version' {state['version']!r} is not {_STATE_VERSION}")
        for key in ("seed", "num_records", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: {key!r} is {state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}; resuming would change the order")
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"sampler state: 'epoch' {epoch!r} must be an integer >= 0")
        if (not isinstance(position, int) or isinstance(position, bool)
                or not 0 <= position < self.epoch_length):
            raise ValueError(f"sampler state: 'position' {position!r} must be in [0, {self.epoch_length})")
        self.epoch, self.position = epoch, position
