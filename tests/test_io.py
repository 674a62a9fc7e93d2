"""Atomic writes: the old content survives a failed write; no temporary files are left."""

import pytest

from r1mega.utils.io import atomic_write_bytes, atomic_write_text


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "config.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write_bytes(path, b"good")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
