"""The error of every checkpoint reader and writer in r1mega.models."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model; the message names the bad tensors."""
