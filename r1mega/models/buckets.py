"""The model's weights as full Hugging Face-named tensors, streamed in buckets of a byte budget.

This is what a rollout engine loads after each training step (``engine.load_weights(bucket)``):
the same names, shapes, dtypes and bytes as :func:`r1mega.models.hf_io.export_hf_weights` writes,
without touching the disk.

How a bucket is made (every rank runs the same plan, in the same order):

1. Plan (once per call): every rank lists the megatron tensors it holds that take part in an
   export (data-parallel replica 0 only; a tied output layer is skipped) with their Hugging Face
   names; an ``all_gather_object`` gives everyone the owner of each: the rank with
   (expert-)tensor-parallel rank 0 among the holders. Units (one megatron tensor -> one or
   more HF tensors: fused q/k/v and gate/up are split) are ordered as
   :func:`~r1mega.models.hf_io.expected_hf_tensors` lists the names, and packed greedily into
   buckets of at most ``bucket_bytes`` (a unit larger than the budget gets a bucket of its own).
2. Gather: for each unit of the bucket, the holders all-gather its tensor-parallel shards over
   their TP group (the expert-TP group for experts) and the owner assembles the full tensors,
   cast to the export dtype. Experts are owned by the EP rank that holds them and pipeline
   stages own their layers, so nothing is gathered over EP or PP.
3. Send: each owner packs its part of the bucket into one byte buffer and broadcasts it to all
   ranks; every rank unpacks views of it (no copy).

Memory: one bucket of full tensors on every rank, plus, on an owner, its shards' all-gather
buffers for one unit and its packed copy. Let go of a bucket before asking for the next one.
The tensors are yielded on every rank (a rollout engine may live on any of them); they are
read-only views of a shared buffer: clone one to keep it past the next bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from r1mega.models.hf_config import ModelDesc
from r1mega.models.hf_io import (
    _ST_DTYPES,
    CheckpointError,
    _group,
    _hf_pieces,
    _model_entries,
    expected_hf_tensors,
    export_dtypes,
)

_ALIGN = 16  # byte alignment of each tensor inside a packed buffer


@dataclass(frozen=True)
class _Unit:
    names: tuple[str, ...]  # HF names, in the order _hf_pieces yields them
    owner: int  # global rank that assembles the unit and sends it
    order: int  # position of its first name in expected_hf_tensors
    nbytes: int


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def plan(model, desc: ModelDesc, dtypes: dict[str, str]):
    """(units in export order, this rank's exporting entries by names); collective."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    shapes = expected_hf_tensors(desc)
    order = {name: i for i, name in enumerate(shapes)}
    mine = {}
    listing = []
    for entry in _model_entries(model, desc):
        if not entry.export:
            continue
        replica = ps.get_expert_data_parallel_rank() if entry.expert else ps.get_data_parallel_rank()
        if replica != 0:
            continue
        names = tuple(entry.hf)
        mine[names] = entry
        listing.append((names, _group(entry.expert)[1] == 0))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, listing)
    owners: dict[tuple[str, ...], int] = {}
    for rank, items in enumerate(everyone):
        for names, is_owner in items:
            if is_owner:
                if names in owners:
                    raise CheckpointError(f"internal: {names[0]!r} is owned by ranks {owners[names]} and {rank}")
                owners[names] = rank
    covered = [n for names in owners for n in names]
    if sorted(covered) != sorted(shapes):
        missing = sorted(set(shapes) - set(covered))
        raise CheckpointError(f"internal: the bucket plan misses {missing[:3]} or repeats a tensor")
    units = [_Unit(names, owner, min(order[n] for n in names),
                   sum(_padded(_nbytes(shapes[n], _ST_DTYPES[dtypes[n]])) for n in names))
             for names, owner in owners.items()]
    return sorted(units, key=lambda u: u.order), mine


def bucketize(units: list[_Unit], bucket_bytes: int) -> list[list[_Unit]]:
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


@torch.no_grad()
def hf_weight_buckets(model, desc: ModelDesc, bucket_bytes: int, *,
                      dtypes: Optional[dict[str, str]] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (Hugging Face name, full tensor) of at most `bucket_bytes` each; every rank.

    `dtypes` maps HF names to safetensors dtypes (F32, BF16, ...) as for export_hf_weights;
    missing names take :func:`~r1mega.models.hf_io.export_dtypes`. Every rank must iterate the
    generator to the end (each bucket is a collective).
    """
    import torch.distributed as dist

    if not isinstance(bucket_bytes, int) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    dtypes = {**export_dtypes(desc), **(dtypes or {})}
    shapes = expected_hf_tensors(desc)
    units, mine = plan(model, desc, dtypes)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device  # NCCL broadcasts CUDA tensors
    for bucket in bucketize(units, bucket_bytes):
        built: dict[str, torch.Tensor] = {}
        for unit in bucket:  # 1. gather the shards of the units this rank holds
            entry = mine.get(unit.names)
            if entry is None:
                continue
            group, _, size = _group(entry.expert)
            local = entry.tensor.detach()
            if entry.split_dim is not None and size > 1:
                chunks = [torch.empty_like(local) for _ in range(size)]
                dist.all_gather(chunks, local.contiguous(), group=group)
            else:
                chunks = [local]
            if rank != unit.owner:
                continue
            for name, full in _hf_pieces(entry, chunks, desc).items():
                if tuple(full.shape) != shapes[name]:
                    raise CheckpointError(f"internal: {name!r} assembled with shape {tuple(full.shape)}, "
                                          f"expected {shapes[name]}")
                built[name] = full.to(_ST_DTYPES[dtypes[name]])
            del chunks
        out: dict[str, torch.Tensor] = {}
        for owner in sorted({u.owner for u in bucket}):  # 2. one broadcast per owner
            names = [n for u in bucket if u.owner == owner for n in u.names]
            layout, total = [], 0
            for name in names:
                dtype = _ST_DTYPES[dtypes[name]]
                layout.append((name, total, dtype))
                total += _padded(_nbytes(shapes[name], dtype))
            buffer = torch.empty(total, dtype=torch.uint8, device=device)
            if rank == owner:
                for name, offset, dtype in layout:
                    raw = built.pop(name).contiguous().reshape(-1).view(torch.uint8)
                    buffer[offset: offset + raw.numel()].copy_(raw)
            if world > 1:
                dist.broadcast(buffer, src=owner)
            for name, offset, dtype in layout:
                n = _nbytes(shapes[name], dtype)
                out[name] = buffer[offset: offset + n].view(dtype).view(shapes[name])
        yield [(name, out[name]) for u in bucket for name in u.names]
        del out
