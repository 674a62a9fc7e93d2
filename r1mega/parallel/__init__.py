"""Parallel layouts (TP, PP, EP, DP) over megatron-core's process groups.

:class:`ParallelConfig` is the layout; :func:`init_parallel` checks the world size against it and
sets up megatron's groups (applying :mod:`r1mega.megatron_compat` where the machine needs it).
"""

from r1mega.parallel.state import (
    Layout,
    ParallelConfig,
    current_layout,
    destroy_parallel,
    init_distributed,
    init_parallel,
)

__all__ = ["Layout", "ParallelConfig", "current_layout", "destroy_parallel", "init_distributed", "init_parallel"]
