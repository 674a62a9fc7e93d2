"""Argument checks and launch parameters shared by the r1mega_kernels launchers.

Every check raises ValueError naming the offending argument, before anything is launched.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

# Logit dtypes the kernels read (math is float32 inside).
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Dtypes of the [S, T] per-token inputs (old/ref/rollout log-probs, advantages): cast to float32 on load.
TOKEN_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TOKEN_ID_DTYPES = (torch.int32, torch.int64)
VALID_DTYPES = (torch.bool, torch.int8, torch.uint8)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(
    name: str,
    x: object,
    *,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int, ...] | None = None,
    like: str | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """ValueError unless ``x`` is a tensor with one of ``dtypes`` (and the shape/device/layout asked)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {_describe(x)}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        source = f" like {like}" if like else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{source}, got {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    return x


class RowLayout(NamedTuple):
    """Where row n = s * T + t of a [S, T, V] (or [N, V]) tensor starts: s * stride_s + t * stride_t."""

    S: int
    T: int
    V: int
    stride_s: int
    stride_t: int

    @property
    def n_rows(self) -> int:
        return self.S * self.T


def row_layout(name: str, x: object, *, dtypes: tuple[torch.dtype, ...] = LOGIT_DTYPES) -> RowLayout:
    """Check a [N, V] or [S, T, V] tensor whose vocabulary dimension is contiguous.

    The leading dimensions may have any strides (e.g. ``logits[:, :-1]`` of a longer sequence), so
    slicing the model output never forces an [N, V] copy.
    """
    check_tensor(name, x, dtypes=dtypes, contiguous=False)
    assert isinstance(x, torch.Tensor)
    if x.dim() == 2:
        S, (T, V), stride_s, stride_t = 1, x.shape, 0, x.stride(0)
    elif x.dim() == 3:
        (S, T, V), (stride_s, stride_t, _) = x.shape, x.stride()
    else:
        raise ValueError(f"{name} must be [N, V] or [S, T, V], got shape {tuple(x.shape)}")
    if V == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(x.shape)}")
    if x.stride(-1) != 1 and V > 1:
        raise ValueError(f"{name} must be contiguous in its last (vocabulary) dimension, got strides {x.stride()}")
    return RowLayout(S, T, V, stride_s, stride_t)


def check_power_of_two(name: str, value: int) -> int:
    if not (isinstance(value, int) and value >= 1 and value & (value - 1) == 0):
        raise ValueError(f"{name} must be a power of two >= 1, got {value!r}")
    return value


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class LaunchParams(NamedTuple):
    rows: int  # tokens per program (ROWS constexpr)
    block_v: int  # vocabulary tile width (BLOCK_V constexpr)
    num_warps: int


def launch_params(device: torch.device, vocab: int, rows_per_program: int | None, block_v: int | None) -> LaunchParams:
    """Tile sizes: explicit values win; otherwise a per-target default.

    On a GPU one program per token with 4096-wide vocabulary tiles (memory-bound, as in Liger's
    GRPO kernel). Under the CPU interpreter the cost is per program and per block operation, so 32
    tokens per program with 2048-wide tiles runs an order of magnitude faster.
    """
    on_gpu = device.type == "cuda" and not interpreting()
    rows = rows_per_program if rows_per_program is not None else (1 if on_gpu else 32)
    check_power_of_two("rows_per_program", rows)
    if block_v is None:
        block_v = min(next_power_of_two(vocab), max(16, (4096 if on_gpu else 65536) // rows), 4096)
    check_power_of_two("block_v", block_v)
    return LaunchParams(rows, block_v, 8 if on_gpu and block_v >= 2048 else 4)
