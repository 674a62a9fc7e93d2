"""Checkpoint directories without a model: the ``latest`` pointer, partial and interrupted saves,
pruning, metadata checks.

The checks that need a trained model (a save SIGKILLed mid-write leaves the previous checkpoint
loadable and no partial step directory; bad saves are refused; resuming in other layouts) are in
tests/test_models_policy.py, which owns the reference run they share.
"""

from __future__ import annotations

import json

import pytest

from r1mega.models.checkpoint import (
    LATEST_NAME,
    META_NAME,
    _cleanup,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
)
from r1mega.models.errors import CheckpointError


def _fake_step(root, step, *, complete=True):
    path = root / f"step_{step:08d}"
    (path / "weights").mkdir(parents=True)
    if complete:
        (path / META_NAME).write_text(json.dumps({"format": 1, "step": step}))
    return path


def test_resolve_follows_latest_and_ignores_partial_directories(tmp_path):
    first, second = _fake_step(tmp_path, 1), _fake_step(tmp_path, 2)
    _fake_step(tmp_path, 3, complete=False)  # a crash before its metadata: not a checkpoint
    (tmp_path / "step_00000004.tmp-0badc0de").mkdir()
    assert resolve_checkpoint(tmp_path) == second  # no pointer: the newest complete one
    (tmp_path / LATEST_NAME).write_text("step_00000001\n")
    assert resolve_checkpoint(tmp_path) == first  # the pointer wins
    assert resolve_checkpoint(second) == second  # a step directory is itself
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    (tmp_path / LATEST_NAME).write_text("step_00000003\n")  # a pointer to an incomplete one: the newest good
    assert resolve_checkpoint(tmp_path) == second


def test_resolve_refuses_a_directory_without_checkpoints(tmp_path):
    (tmp_path / "step_00000001.tmp-00000000").mkdir()
    with pytest.raises(CheckpointError, match="not an r1mega checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / META_NAME).write_text("{\"format\": 99}")
    with pytest.raises(CheckpointError, match="format 99"):
        read_meta(tmp_path / "x")


def test_cleanup_removes_interrupted_saves_and_old_steps(tmp_path):
    steps = [_fake_step(tmp_path, s) for s in (1, 2, 3)]
    (tmp_path / "step_00000004.tmp-12345678").mkdir()
    (tmp_path / "notes.txt").write_text("kept")
    _cleanup(tmp_path, keep_last=2, keep=steps[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_00000002", "step_00000003"]
    _cleanup(tmp_path, keep_last=None, keep=steps[-1])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_rng_state_round_trips_without_pickle(tmp_path, monkeypatch):
    import pickle
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file

    from r1mega.models.checkpoint import read_rng_state_files, rng_state, rng_state_files, set_rng_state

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)
    np.random.standard_normal()  # numpy's legacy Gaussian cache is now full: part of the state
    tensor_path, json_path = rng_state_files(rng_state(), tmp_path / "rank_00000")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(4))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    def refuse(*args, **kwargs):
        raise AssertionError("an RNG state must load without unpickling")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    set_rng_state(read_rng_state_files(tmp_path / "rank_00000"))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank_00000.json", "rank_00000.safetensors"]
    json.loads(json_path.read_text())  # plain JSON
    assert "torch" in load_file(str(tensor_path)) and "numpy.keys" in load_file(str(tensor_path))


def _step_with_files(root, step, payload=b"weights"):
    path = _fake_step(root, step, complete=False)
    (path / "weights" / "__0_0.distcp").write_bytes(payload)
    (path / META_NAME).write_text(json.dumps({"format": 1, "step": step,
                                              "files": {"weights/__0_0.distcp": len(payload)}}))
    return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, capsys):
    from r1mega.models.checkpoint import checkpoint_problem

    first, second, third = (_step_with_files(tmp_path, s) for s in (1, 2, 3))
    (tmp_path / LATEST_NAME).write_text("step_00000003\n")
    assert resolve_checkpoint(tmp_path) == third and checkpoint_problem(third) is None
    (third / "weights" / "__0_0.distcp").write_bytes(b"weig")  # truncated by a full disk
    (second / "weights" / "__0_0.distcp").unlink()  # lost
    assert resolve_checkpoint(tmp_path) == first
    err = capsys.readouterr().err
    assert "step_00000002" in err and "missing" in err and "loading" in err and str(first) in err
    assert "step_00000003" in err and "has 4 bytes" in err
    assert "has 4 bytes, the save wrote 7" in checkpoint_problem(third)
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        resolve_checkpoint(third)  # named explicitly: no silent substitute
    (first / META_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="every checkpoint is damaged"):
        resolve_checkpoint(tmp_path)
