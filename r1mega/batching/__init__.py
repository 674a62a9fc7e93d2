"""CPU-side batching: balance sequence lengths across data-parallel ranks and pack micro-batches.

Each function runs on the C++ extension ``r1mega._batching`` when it is built (``backend=None``),
or on an identical pure-Python twin (``backend="python"``); see :mod:`r1mega.batching.balance`
for the exact algorithm, tie-breaking and micro-batch contract.
"""

from r1mega.batching.balance import (
    KK_ATTEMPTS,
    available_backends,
    default_backend,
    imbalance,
    lower_bound,
    pack_microbatches,
    partition_balanced,
)

__all__ = [
    "KK_ATTEMPTS",
    "available_backends",
    "default_backend",
    "imbalance",
    "lower_bound",
    "pack_microbatches",
    "partition_balanced",
]
