"""Object collectives of the loop over torch.distributed (any backend), and where engines live.

Every function is collective: every rank of the default group calls it.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def engine_ranks(layout) -> list[int]:
    """The first rank of every data-parallel replica (tensor and pipeline rank 0): where the
    rollout engines live."""
    mine = layout.tp_rank == 0 and layout.pp_rank == 0
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (dist.get_rank(), mine))
    return sorted(r for r, is_engine in flags if is_engine)


def share(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of n items split into `parts` near-equal contiguous parts."""
    return round(index * n / parts), round((index + 1) * n / parts)


def everyone(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["engine_ranks", "everyone", "from_rank0", "share"]
