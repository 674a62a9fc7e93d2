"""A policy's weights out: Hugging Face directories, their side files, and weight streams for refits.

:class:`WeightExport` knows the model, the safetensors dtype of every HF tensor (the source's,
so an export is bit-identical to its source when the model dtype holds it) and the directory of
the source's non-weight files (config, tokenizer, generation config), which every export and
checkpoint carries along.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from r1mega.models.buckets import WeightStream
from r1mega.models.hf_checkpoint import copy_files, export_hf_weights, hf_side_files
from r1mega.models.hf_config import ModelDesc
from r1mega.models.hf_mapping import export_dtypes
from r1mega.utils.io import atomic_write_text


class WeightExport:
    """The weights of this rank's `model` as Hugging Face tensors.

    ``hf_dtypes``: HF name -> safetensors dtype, `hf_dtypes` over :func:`export_dtypes`'s
    defaults. `side_files`: the source directory whose non-weight files go with every export
    (None: only a config.json made from ``desc.config``).
    """

    def __init__(self, model, desc: ModelDesc, *, hf_dtypes: Optional[dict], side_files: Optional[Path]):
        self.model, self.desc, self.side_files = model, desc, side_files
        self.hf_dtypes = {**export_dtypes(desc), **(hf_dtypes or {})}
        self._streams: dict = {}

    def stream(self, *, dtypes: Optional[dict[str, str]] = None, dst_ranks: Optional[Sequence[int]] = None):
        """The :class:`~r1mega.models.buckets.WeightStream` for these options (collective the first
        time; kept and reused, so a refit every step plans once)."""
        dtypes = {**self.hf_dtypes, **(dtypes or {})}
        key = (tuple(sorted(dtypes.items())), None if dst_ranks is None else tuple(sorted(set(dst_ranks))))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = WeightStream(self.model, self.desc, dtypes=dtypes, dst_ranks=dst_ranks)
        return stream

    def export_hf(self, out_dir: str | Path) -> list[str]:
        """Write a Hugging Face directory (safetensors in ``hf_dtypes``, the source's config.json
        verbatim, its other side files); every rank. Returns the weight files this rank wrote."""
        import torch.distributed as dist

        out_dir = Path(out_dir)
        config_file = self.side_files / "config.json" if self.side_files else None
        config_json = config_file.read_text() if config_file and config_file.is_file() else None
        written = export_hf_weights(self.model, self.desc, out_dir, dtypes=self.hf_dtypes, config_json=config_json)
        if dist.get_rank() == 0:
            self.write_side_files(out_dir, skip_config=True)
        dist.barrier()
        return written

    def write_side_files(self, dest: Path, *, skip_config: bool = False) -> None:
        """Copy the source's non-weight files into `dest` (created); without a source config.json
        (and unless `skip_config`), write one from ``desc.config``. One rank calls it."""
        dest.mkdir(parents=True, exist_ok=True)
        files = hf_side_files(self.side_files) if self.side_files and self.side_files.is_dir() else []
        files = [f for f in files if not (skip_config and f.name == "config.json")]
        copy_files(files, dest)
        if not skip_config and not (dest / "config.json").exists():
            atomic_write_text(dest / "config.json", json.dumps(self.desc.config, indent=2) + "\n")
