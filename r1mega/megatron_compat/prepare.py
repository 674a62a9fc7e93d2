"""The one entry point the rest of r1mega calls before building megatron models on this machine.

:func:`prepare_megatron` picks the process-wide patch groups the machine needs: the CPU shim
(:mod:`r1mega.megatron_compat.cpu_shim`, which includes the local-spec group) without a CUDA
device, the local-spec group (:mod:`r1mega.megatron_compat.local_spec`) on CUDA without Transformer
Engine, nothing on CUDA with Transformer Engine.
"""

from __future__ import annotations

import torch

from r1mega.megatron_compat.applied import applied_patches
from r1mega.megatron_compat.cpu_shim import apply_cpu_shim
from r1mega.megatron_compat.local_spec import apply_local_spec_workarounds
from r1mega.megatron_compat.te_probe import megatron_has_te


def prepare_megatron() -> list[str]:
    """Apply what this machine needs before megatron models are built; return the groups applied.

    No CUDA: the CPU shim (which includes the local-spec group). CUDA without Transformer Engine:
    the local-spec group. CUDA with Transformer Engine: nothing.
    """
    if not torch.cuda.is_available():
        apply_cpu_shim()
    elif not megatron_has_te():
        apply_local_spec_workarounds()
    return applied_patches()
