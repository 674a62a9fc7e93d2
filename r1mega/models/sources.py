"""What a model path is: a Hugging Face directory, a converted checkpoint, or a training checkpoint.

:func:`resolve_source` looks at the directory only (no weights are read): a ``r1mega convert
--to-megatron`` output has ``r1mega_megatron.json``; a Hugging Face directory has ``config.json``
and is no checkpoint step; anything else must be an r1mega training checkpoint (a root with
``latest``, or one ``step_N/``; see :mod:`r1mega.models.checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from r1mega.models import checkpoint as ckpt
from r1mega.models.convert import HF_FILES, MEGATRON_META, MEGATRON_WEIGHTS
from r1mega.models.errors import CheckpointError


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config, side files and weights are."""

    kind: str  # hf | converted | checkpoint
    path: Path  # the HF dir, the converted dir, or the checkpoint's step directory
    config_dir: Path  # holds config.json (and the other non-weight files)
    weights: Optional[Path]  # dist_checkpointing directory (converted, checkpoint)
    hf_dtypes: Optional[dict]  # HF name -> safetensors dtype the source recorded (None for hf: read on load)


def resolve_source(path: str | Path) -> ModelSource:
    """The :class:`ModelSource` of `path`; CheckpointError when it is no directory or no checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / MEGATRON_META).is_file():
        meta = json.loads((path / MEGATRON_META).read_text())
        return ModelSource("converted", path, path / HF_FILES, path / MEGATRON_WEIGHTS, meta.get("dtypes"))
    if (path / "config.json").is_file() and not ckpt.is_checkpoint_dir(path):
        return ModelSource("hf", path, path, None, None)
    step_dir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(step_dir)
    return ModelSource("checkpoint", step_dir, step_dir / ckpt.HF_DIR, step_dir / ckpt.WEIGHTS_DIR,
                       meta.get("hf_dtypes"))
