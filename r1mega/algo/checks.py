"""Argument validation shared by the r1mega.algo functions: each error names the argument.

Importing it does not import torch (the config validates loss options through
r1mega.algo.loss_spec, and ``r1mega --help`` must stay light): an object can only be a tensor
once torch is loaded, so the tensor checks look torch up in ``sys.modules``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence


def _is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def describe(x: object) -> str:
    """Short description of an argument for error messages."""
    if _is_tensor(x):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def real(name: str, value: object) -> float:
    """``value`` as a float; ValueError unless it is a finite real number.

    Accepts Python numbers, numpy scalars and one-element tensors (e.g. an all-reduced count).
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number, got {describe(value)}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite real number, got {describe(value)}")
    return number


def positive(name: str, value: object) -> float:
    """``value`` as a float; ValueError unless it is a finite number > 0."""
    number = real(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def check_floating(name: str, x: object, ndim: int | None = None) -> None:
    """ValueError unless ``x`` is a floating tensor (with ``ndim`` dimensions when given)."""
    if not (_is_tensor(x) and x.is_floating_point() and ndim in (None, x.dim())):
        rank = "" if ndim is None else f"{ndim}-D "
        raise ValueError(f"{name} must be a {rank}floating tensor, got {describe(x)}")


def check_integer(name: str, x: object) -> None:
    if not (
        _is_tensor(x)
        and not x.is_floating_point()
        and not x.is_complex()
        and x.dtype != sys.modules["torch"].bool
    ):
        raise ValueError(f"{name} must be an integer tensor, got {describe(x)}")


def check_shape(name: str, x: object, shape: "torch.Size", like: str, floating: bool = False) -> None:
    """ValueError unless ``x`` is a tensor of the shape of ``like`` (and floating, if asked)."""
    if not _is_tensor(x):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} like {like}, got {describe(x)}")
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {like} has shape {tuple(shape)}")
    if floating:
        check_floating(name, x)
