"""A key/value cache for transformers models that writes in place instead of concatenating.

transformers' DynamicLayer grows by ``torch.cat`` every step, copying the whole cache each time
(measured: a third of a tiny MoE model's decode step on CPU). :class:`BufferLayer` keeps a
preallocated buffer per layer, writes the new positions into it and hands the attention a view of
the filled part; the buffer doubles when full (amortised O(1) per token). Rows are removed
(`select_rows`) when completions finish, so later steps compute only live rows.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class BufferLayer(DynamicLayer):
    """One layer's cache: buffers [B, H, capacity, D] filled up to ``length``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k = self._v = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        end = self.length + new
        if self._k is None:
            cap = max(self.capacity, end)
            self._k = key_states.new_empty(key_states.shape[:-2] + (cap, key_states.shape[-1]))
            self._v = value_states.new_empty(value_states.shape[:-2] + (cap, value_states.shape[-1]))
        elif end > self._k.shape[-2]:
            self._grow(max(end, 2 * self._k.shape[-2]))
        self._k[..., self.length:end, :].copy_(key_states)
        self._v[..., self.length:end, :].copy_(value_states)
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:-2] + (capacity, old.shape[-1]))
            new[..., :self.length, :].copy_(old[..., :self.length, :])
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order)."""
        if self._k is not None:
            self._k = self._k.index_select(0, rows)
            self._v = self._v.index_select(0, rows)
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    def repeat_rows(self, repeats: int) -> None:
        """Each row `repeats` times in a row (prompt i -> its n samples)."""
        if self._k is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k[..., :self.length, :], self._v[..., :self.length, :]

    # transformers' own names for the same operations
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_rows(repeats)

    def reset(self) -> None:
        self._k = self._v = self.keys = self.values = None
        self.length = 0
        self.is_initialized = False


def buffer_cache(model_config, capacity: int) -> DynamicCache:
    """A DynamicCache for `model_config` whose full-attention layers are BufferLayers."""
    cache = DynamicCache(config=model_config)
    n = model_config.get_text_config(decoder=True).num_hidden_layers
    if not cache.layers:
        cache.layers = [DynamicLayer() for _ in range(n)]
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = BufferLayer(capacity)
        else:
            raise NotImplementedError(f"cache layer {i} is a {type(layer).__name__}; the hf engine supports "
                                      "full-attention layers only")
    return cache


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.select_rows(rows)


def repeat_rows(cache: DynamicCache, repeats: int) -> None:
    for layer in cache.layers:
        layer.repeat_rows(repeats)
