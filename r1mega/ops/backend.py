"""Which implementation an op runs: the Triton kernels where they can run, else chunked torch."""

from __future__ import annotations

import torch

from r1mega.algo.checks import check_choice
from r1mega.utils.triton_env import interpreter_on, triton_can_run

BACKENDS = ("triton", "torch")
TRITON_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_unavailable_reason(logits: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on these logits, or None when it can."""
    if not triton_can_run():
        return "Triton is not installed, or there is neither a CUDA device nor TRITON_INTERPRET=1"
    if logits.device.type != "cuda" and not (interpreter_on() and logits.device.type == "cpu"):
        return f"logits are on {logits.device}: Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
    if logits.dtype not in TRITON_LOGIT_DTYPES:
        return f"logits have dtype {logits.dtype}; the kernels read float32, bfloat16 or float16"
    return None


def resolve_backend(backend: str | None, logits: torch.Tensor) -> str:
    """``backend`` checked, or the default: "triton" where it can run on ``logits``, else "torch"."""
    if backend is None:
        return "triton" if triton_unavailable_reason(logits) is None else "torch"
    check_choice("backend", backend, BACKENDS)
    if backend == "triton":
        reason = triton_unavailable_reason(logits)
        if reason is not None:
            raise ValueError(f'backend="triton" cannot run here: {reason}')
    return backend
