"""Which process-wide patch groups this process has applied ('local-spec', 'cpu').

The groups of :mod:`r1mega.megatron_compat.local_spec` and :mod:`r1mega.megatron_compat.cpu_shim`
patch megatron-core and torch in place, once per process; they record themselves here so that a
second call is a no-op and tests can tell what ran.
"""

from __future__ import annotations

_applied: set[str] = set()


def is_applied(group: str) -> bool:
    """Whether the patch group `group` was applied in this process."""
    return group in _applied


def mark_applied(group: str) -> None:
    """Record that the patch group `group` is applied in this process."""
    _applied.add(group)


def applied_patches() -> list[str]:
    """Names of the patch groups applied in this process ('local-spec', 'cpu')."""
    return sorted(_applied)
