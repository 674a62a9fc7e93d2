"""Where Triton kernels can run, and switching on its CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is *defined*, i.e. when the
module holding it is imported. So the switch must happen before any ``r1mega_kernels`` submodule
is imported; :func:`use_interpreter_without_cuda` refuses to act too late rather than silently
leaving compiled kernels that cannot launch ("0 active drivers").
"""

from __future__ import annotations

import os
import sys


def interpreter_on() -> bool:
    """True when Triton will interpret kernels on the CPU instead of compiling them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_interpreter_without_cuda() -> bool:
    """Turn on the Triton interpreter when no CUDA device is present; return whether it is on.

    Raises RuntimeError if kernel modules were already imported in compiled mode, since their
    kernels were built for a GPU that is not there.
    """
    import torch

    if torch.cuda.is_available() or interpreter_on():
        return interpreter_on()
    too_late = sorted(name for name in sys.modules if name.startswith("r1mega_kernels."))
    if too_late:
        raise RuntimeError(
            "TRITON_INTERPRET must be set before Triton kernels are imported; already imported: "
            + ", ".join(too_late)
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def triton_can_run() -> bool:
    """True when Triton is installed and has a target: a CUDA device or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or interpreter_on()
