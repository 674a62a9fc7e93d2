"""The model's weights as full Hugging Face-named tensors, streamed in buckets of a byte budget.

This is what a rollout engine loads after each training step (``engine.refit(stream.buckets(n))``):
the same names, shapes, dtypes and bytes as :func:`r1mega.models.hf_checkpoint.export_hf_weights` writes,
without touching the disk. It runs every step, so:

* **The plan is made once.** :class:`WeightStream` lists which rank owns each tensor with one
  ``all_gather_object`` when it is built (:meth:`r1mega.models.Policy.weight_stream` keeps one per
  set of options); every refit after that exchanges tensors only.
* **Only engine ranks receive.** With ``dst_ranks`` the owners send each bucket point to point to
  those ranks (the ones hosting an engine); the other ranks take part in the tensor-parallel
  gathers of what they own and see empty buckets. Without it every rank receives (one
  broadcast per owner), as a colocated engine on every GPU needs.
* **Layer order.** Tensors come as the model runs: the embedding, then layer 0, 1, ... (each
  layer's tensors together), then the final norm and the output layer, so an engine that
  finalises a layer once all its weights arrived (vLLM's layerwise reload) never buffers
  out-of-order layers.
* **No tensor is refused.** Units (one megatron tensor -> one or more HF tensors: fused q/k/v and
  gate/up are split) are packed greedily into buckets of at most ``bucket_bytes``; a unit larger
  than the budget is sent alone in a bucket of its own.

How a bucket moves: for each unit the holders all-gather its tensor-parallel shards over their TP
group (the expert-TP group for experts) and the owner (the holder with (expert-)TP rank 0, on
data-parallel replica 0) assembles the full tensors in the export dtype. Experts are owned by the
EP rank holding them and pipeline stages own their layers, so nothing is gathered over EP or PP.
Each owner packs its part of the bucket into one byte buffer and sends it; receivers unpack views
(an owner that is the only receiver yields its tensors as built, without packing).

Memory: one bucket of full tensors on every receiving rank, plus, on an owner, its shards'
all-gather buffers for one unit and its packed copy. The tensors are read-only: views of a shared
buffer or, where the owner is the only receiver, possibly the model's own parameter; clone one to
keep it past the next bucket or the next training step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.models.errors import CheckpointError
from r1mega.models.hf_config import ModelDesc
from r1mega.models.hf_mapping import (
    entry_tp_group,
    expected_hf_tensors,
    export_dtypes,
    gather_chunks,
    hf_pieces,
    model_entries,
)
from r1mega.models.safetensors_io import ST_DTYPES

_ALIGN = 16  # byte alignment of each tensor inside a packed buffer
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    """One megatron tensor's Hugging Face tensors, who sends them and their packed size."""

    names: tuple[str, ...]  # HF names, in the order hf_pieces yields them
    owner: int  # global rank that assembles the unit and sends it
    order: tuple[int, int]  # (layer position, position in expected_hf_tensors)
    nbytes: int


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layer_position(name: str, num_layers: int) -> int:
    """Where `name` comes in the forward pass: embedding -1, layer L at L, norm / lm_head after."""
    m = _LAYER.match(name)
    if m is not None:
        return int(m.group(1))
    return -1 if name.startswith("model.embed_tokens") else num_layers


def bucketize(units: list[Unit], bucket_bytes: int) -> list[list[Unit]]:
    """Greedy packing in order; a unit larger than the budget gets a bucket of its own."""
    buckets, current, size = [], [], 0
    for unit in units:
        if current and size + unit.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit.nbytes
    if current:
        buckets.append(current)
    return buckets


class WeightStream:
    """The weight stream of one model in one layout; build it on every rank (collective).

    `dtypes` maps HF names to safetensors dtypes (F32, BF16, ...) as for export_hf_weights
    (missing names take :func:`~r1mega.models.hf_mapping.export_dtypes`). `dst_ranks`: the global ranks
    that receive the tensors (None: all).
    """

    def __init__(self, model, desc: ModelDesc, *, dtypes: Optional[dict[str, str]] = None,
                 dst_ranks: Optional[Sequence[int]] = None):
        import torch.distributed as dist

        world = dist.get_world_size()
        if dst_ranks is not None:
            dst_ranks = sorted(set(int(r) for r in dst_ranks))
            if not dst_ranks or dst_ranks[0] < 0 or dst_ranks[-1] >= world:
                raise ValueError(f"dst_ranks must be a non-empty list of ranks in [0, {world}), got {dst_ranks}")
        self.model, self.desc = model, desc
        self.dtypes = {**export_dtypes(desc), **(dtypes or {})}
        self.dst_ranks = dst_ranks
        self.shapes = expected_hf_tensors(desc)
        order = {name: i for i, name in enumerate(self.shapes)}
        listing = []
        for entry in self._entries().values():
            listing.append((tuple(entry.hf), entry_tp_group(entry.expert)[1] == 0))
        everyone = [None] * world
        dist.all_gather_object(everyone, listing)
        owners: dict[tuple[str, ...], int] = {}
        for rank, items in enumerate(everyone):
            for names, is_owner in items:
                if is_owner:
                    if names in owners:
                        raise CheckpointError(f"internal: {names[0]!r} is owned by ranks {owners[names]} and {rank}")
                    owners[names] = rank
        covered = [n for names in owners for n in names]
        if sorted(covered) != sorted(self.shapes):
            missing = sorted(set(self.shapes) - set(covered))
            raise CheckpointError(f"internal: the bucket plan misses {missing[:3]} or repeats a tensor")
        layers = desc.num_layers
        self.units = sorted(
            (Unit(names, owner, (layer_position(names[0], layers), min(order[n] for n in names)),
                  sum(_padded(_nbytes(self.shapes[n], ST_DTYPES[self.dtypes[n]])) for n in names))
             for names, owner in owners.items()), key=lambda u: u.order)
        self.total_bytes = sum(_nbytes(self.shapes[n], ST_DTYPES[self.dtypes[n]]) for n in self.shapes)

    def _entries(self):
        """This rank's exporting megatron tensors by their HF names (local; cheap)."""
        from megatron.core import parallel_state as ps

        mine = {}
        for entry in model_entries(self.model, self.desc):
            if not entry.export:
                continue
            replica = ps.get_expert_data_parallel_rank() if entry.expert else ps.get_data_parallel_rank()
            if replica == 0:
                mine[tuple(entry.hf)] = entry
        return mine

    @property
    def receives(self) -> bool:
        """Whether this rank gets the tensors."""
        import torch.distributed as dist

        return self.dst_ranks is None or dist.get_rank() in self.dst_ranks

    @torch.no_grad()
    def buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield lists of (Hugging Face name, full tensor) of at most `bucket_bytes` each (or one
        larger tensor alone). Every rank must iterate to the end (each bucket is collective);
        ranks outside `dst_ranks` get empty lists."""
        import torch.distributed as dist

        if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        mine = self._entries()  # fresh references: a checkpoint load may have replaced tensors
        rank, world = dist.get_rank(), dist.get_world_size()
        device = next(self.model.parameters()).device  # NCCL moves CUDA tensors
        for bucket in bucketize(self.units, bucket_bytes):
            built: dict[str, torch.Tensor] = {}
            for unit in bucket:  # 1. gather the shards of the units this rank holds
                entry = mine.get(unit.names)
                if entry is None:
                    continue
                chunks = gather_chunks(entry)
                if rank != unit.owner:
                    continue
                for name, full in hf_pieces(entry, chunks, self.desc).items():
                    if tuple(full.shape) != self.shapes[name]:
                        raise CheckpointError(f"internal: {name!r} assembled with shape {tuple(full.shape)}, "
                                              f"expected {self.shapes[name]}")
                    built[name] = full.to(ST_DTYPES[self.dtypes[name]])
                del chunks
            out: dict[str, torch.Tensor] = {}
            for owner in sorted({u.owner for u in bucket}):  # 2. one packed buffer per owner
                names = [n for u in bucket if u.owner == owner for n in u.names]
                targets = [r for r in (range(world) if self.dst_ranks is None else self.dst_ranks) if r != owner]
                receive = rank != owner and rank in targets
                if rank != owner and not receive:
                    continue
                if rank == owner and not (targets and world > 1):  # nobody else receives: no packing copy
                    if self.dst_ranks is None or owner in self.dst_ranks:
                        out.update((name, built.pop(name)) for name in names)
                    continue
                layout, total = [], 0
                for name in names:
                    dtype = ST_DTYPES[self.dtypes[name]]
                    layout.append((name, total, dtype))
                    total += _padded(_nbytes(self.shapes[name], dtype))
                buffer = torch.empty(total, dtype=torch.uint8, device=device)
                if rank == owner:
                    for name, offset, dtype in layout:
                        raw = built.pop(name).contiguous().reshape(-1).view(torch.uint8)
                        buffer[offset: offset + raw.numel()].copy_(raw)
                self._send(buffer, owner, targets, rank, world)
                if rank == owner and self.dst_ranks is not None and owner not in self.dst_ranks:
                    continue
                for name, offset, dtype in layout:
                    n = _nbytes(self.shapes[name], dtype)
                    out[name] = buffer[offset: offset + n].view(dtype).view(self.shapes[name])
            yield [(name, out[name]) for u in bucket for name in u.names if name in out]
            del out

    def _send(self, buffer: torch.Tensor, owner: int, targets: list[int], rank: int, world: int) -> None:
        import torch.distributed as dist

        if world == 1 or not targets:
            return
        if self.dst_ranks is None:
            dist.broadcast(buffer, src=owner)
        elif rank == owner:
            for req in [dist.isend(buffer, dst=t) for t in targets]:
                req.wait()
        else:
            dist.recv(buffer, src=owner)


def hf_weight_buckets(model, desc: ModelDesc, bucket_bytes: int, *, dtypes: Optional[dict[str, str]] = None,
                      dst_ranks: Optional[Sequence[int]] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """One pass of a fresh :class:`WeightStream` (plans again: prefer a kept stream for refits)."""
    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    return WeightStream(model, desc, dtypes=dtypes, dst_ranks=dst_ranks).buckets(bucket_bytes)
