"""Hugging Face ``datasets`` directories (``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``),
read with the ``datasets`` library itself, offline. The one module that imports it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MARKERS = ("state.json", "dataset_dict.json")


class SavedDatasetError(ValueError):
    """A saved dataset that cannot be read as asked; the message is one line naming the directory."""


def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a directory written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in _MARKERS)


def saved_dataset_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of a saved Dataset, or of split `split` of a saved DatasetDict
    (None: its only split). `where` is "row N (0-based)", or "split S row N (0-based)"."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing downloads at run time
    import datasets

    path = Path(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise SavedDatasetError(f"{path}: not a readable saved dataset ({' '.join(str(err).split())})") from None
    prefix = ""
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            asked = f"has no split {split!r}" if split is not None else "has several splits"
            raise SavedDatasetError(f"{path}: the saved DatasetDict {asked} (splits: {', '.join(splits)}); "
                                    "set data.split to one of them")
        loaded, prefix = loaded[split], f"split {split} "
    elif split is not None:
        raise SavedDatasetError(f"{path}: data.split {split!r}: the saved dataset is a single Dataset (no splits)")
    for index, row in enumerate(loaded):
        yield f"{prefix}row {index} (0-based)", row


__all__ = ["SavedDatasetError", "is_saved_dataset", "saved_dataset_rows"]
