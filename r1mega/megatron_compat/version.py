"""The megatron-core version r1mega's workarounds were written for, and the guard that checks it.

Every patch in :mod:`r1mega.megatron_compat` was measured against megatron-core ``MEGATRON_VERSION``
(0.16.1): it replaces or wraps that version's functions, so on another version it may patch the
wrong thing silently. :func:`check_megatron_version` refuses another version with
:class:`ShimVersionError` unless ``R1MEGA_ALLOW_MEGATRON_VERSION=1`` is set, in which case it warns
and lets the caller apply its patches anyway. :func:`megatron_version_matches` is the quiet form,
for per-model fixes that are simply skipped on another version.
"""

from __future__ import annotations

import os
import warnings

MEGATRON_VERSION = "0.16.1"
ALLOW_ENV = "R1MEGA_ALLOW_MEGATRON_VERSION"


class ShimVersionError(RuntimeError):
    """The installed megatron-core is not the version these patches were written for."""


def installed_megatron_version() -> str:
    """The installed megatron-core version (from package metadata; megatron is not imported)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on sys.path
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")


def megatron_version_matches() -> bool:
    """Whether the installed megatron-core is MEGATRON_VERSION (no warning, no error)."""
    return installed_megatron_version() == MEGATRON_VERSION


def check_megatron_version(found: str | None = None) -> None:
    """Refuse (ShimVersionError) a megatron-core other than MEGATRON_VERSION, or warn when
    R1MEGA_ALLOW_MEGATRON_VERSION=1."""
    found = installed_megatron_version() if found is None else found
    if found == MEGATRON_VERSION:
        return
    message = (f"r1mega's megatron-core workarounds were written for megatron-core=={MEGATRON_VERSION}, "
               f"found {found}")
    if os.environ.get(ALLOW_ENV, "") == "1":
        warnings.warn(f"{message}; applying them anyway because {ALLOW_ENV}=1", RuntimeWarning, stacklevel=3)
        return
    raise ShimVersionError(f"{message}; install megatron-core=={MEGATRON_VERSION} or set {ALLOW_ENV}=1 "
                           "to try anyway")
