"""Tests' bridge to the one-value loss API: option dicts (loss options mixed with tensors and
denominators, as the test cases write them) split into an r1mega.algo.LossSpec and the rest."""

from __future__ import annotations

import dataclasses

from r1mega.algo.loss_spec import LossSpec

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(LossSpec))


def split_options(opts: dict) -> tuple[LossSpec, dict]:
    """(LossSpec of the loss options in ``opts``, a dict of everything else): the spec is built,
    so validated, here; tensors, denominators and call keywords stay call arguments."""
    spec = LossSpec(**{k: v for k, v in opts.items() if k in SPEC_FIELDS})
    return spec, {k: v for k, v in opts.items() if k not in SPEC_FIELDS}


def with_spec(fn):
    """``fn`` (one of the loss implementations, whose spec follows the positional tensors) called
    the old way, ``wrapped(*tensors, **opts)``, with the loss options of ``opts`` as its LossSpec."""

    def wrapped(*args, **opts):
        spec, rest = split_options(opts)
        return fn(*args, spec, **rest)

    wrapped.__name__ = getattr(fn, "__name__", "loss")
    return wrapped
