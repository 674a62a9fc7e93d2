"""A Hugging Face checkpoint directory <-> a megatron GPTModel in any TP/EP/PP layout, streaming.

Loading (:func:`load_hf_weights`)
    The directory is checked first, from the safetensors headers alone (no tensor is read): every
    tensor the model needs is present with the expected shape, and nothing else is there
    (:func:`check_hf_checkpoint`; a :class:`CheckpointError` names the first bad tensors and their
    files; an unsupported architecture was already refused by :mod:`r1mega.models.hf_config`).
    Then each rank reads only the slices it owns (``safe_open(...).get_slice(name)[a:b]``): its
    pipeline stage's layers, its experts, its tensor-parallel rows or columns. No rank holds a
    full copy of the model; the largest transient is one rank-local parameter.

Exporting (:func:`export_hf_weights`)
    Per-rank shards plus an index, written by the ranks that own the data: TP/expert-TP shards of
    one parameter are all-gathered within their group (one parameter at a time) and written by
    the group's first rank; data-parallel replicas do not write. Each writer streams its own
    ``model-0000k-of-0000n.safetensors`` (header first, then one tensor at a time), rank 0 writes
    ``model.safetensors.index.json`` (a single writer writes ``model.safetensors`` and no index,
    like ``save_pretrained``). Tensor names, shapes, dtypes and bytes equal the source checkpoint's
    (the file split may differ): a HF -> megatron -> HF round trip is bit-identical per tensor as
    long as the model dtype holds the source values exactly (the same dtype, or a wider one).

The tensor names and shard pieces are :mod:`r1mega.models.hf_mapping`'s, the file format
:mod:`r1mega.models.safetensors_io`'s; whole-directory conversion (``r1mega convert``) is
:mod:`r1mega.models.convert`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from r1mega.models.errors import CheckpointError
from r1mega.models.hf_config import ModelDesc, with_explicit_router_fields
from r1mega.models.hf_mapping import (
    entry_tp_group,
    expected_hf_tensors,
    export_dtypes,
    gather_chunks,
    hf_pieces,
    is_ignored_hf_tensor,
    model_entries,
    read_local_tensor,
)
from r1mega.models.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    ST_DTYPES,
    SliceReader,
    StreamingWriter,
    TensorInfo,
    scan_hf_checkpoint,
    tensor_bytes,
)
from r1mega.utils.io import atomic_write_bytes, atomic_write_text


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------
def _fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def check_hf_checkpoint(path: str | Path, desc: ModelDesc) -> tuple[dict[str, TensorInfo], list[str]]:
    """Check a directory against `desc` from its headers; return (tensors it holds, ignored names).

    Raises CheckpointError naming the missing, unexpected and mis-shaped tensors (the first few,
    with the count of the rest), before any tensor data is read.
    """
    found = scan_hf_checkpoint(path)
    expected = expected_hf_tensors(desc)
    problems, ignored = [], []
    for name, shape in expected.items():
        info = found.get(name)
        if info is None:
            problems.append(f"missing tensor {name!r} (expected shape {_fmt_shape(shape)})")
        elif info.shape != shape:
            problems.append(f"tensor {name!r} in {info.file} has shape {_fmt_shape(info.shape)}, "
                            f"expected {_fmt_shape(shape)}")
        elif info.dtype not in ST_DTYPES or not ST_DTYPES[info.dtype].is_floating_point:
            problems.append(f"tensor {name!r} in {info.file} has dtype {info.dtype}, expected a float dtype")
    for name in sorted(set(found) - set(expected)):
        if is_ignored_hf_tensor(desc, name):
            ignored.append(name)
        else:
            problems.append(f"unexpected tensor {name!r} in {found[name].file}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path} ({desc.arch}): " + "; ".join(problems[:3]) + more)
    return {n: found[n] for n in expected}, ignored


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load read: the source dtype of every tensor, and the tensors it ignored."""

    dtypes: dict[str, str] = field(default_factory=dict)  # HF name -> safetensors dtype (F32, BF16, ...)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0  # megatron tensors filled on this rank


@torch.no_grad()
def load_hf_weights(model, desc: ModelDesc, path: str | Path) -> LoadReport:
    """Fill this rank's part of `model` from the Hugging Face checkpoint in `path`.

    Call on every rank after build_model; each rank reads only its own slices. The directory is
    checked against `desc` first (CheckpointError names the bad tensors). Values are cast to the
    model's parameter dtype.
    """
    root = Path(path)
    tensors, ignored = check_hf_checkpoint(root, desc)
    report = LoadReport(dtypes={n: info.dtype for n, info in tensors.items()}, ignored=ignored)
    with SliceReader(root, tensors) as reader:
        for entry in model_entries(model, desc):
            value = read_local_tensor(entry, reader, desc)
            if tuple(value.shape) != tuple(entry.tensor.shape):
                raise CheckpointError(
                    f"{root}: megatron tensor {entry.name!r} has local shape {_fmt_shape(entry.tensor.shape)}, "
                    f"but {', '.join(entry.hf)} give {_fmt_shape(value.shape)}")
            entry.tensor.data.copy_(value.to(entry.tensor.dtype))
            report.loaded += 1
    return report


# ---------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------
def check_export_target(root: Path) -> None:
    """CheckpointError unless `root` holds no safetensors weights yet (an export never mixes files)."""
    if (root / INDEX_NAME).exists() or any(root.glob("*.safetensors")):
        raise CheckpointError(f"{root}: already holds safetensors weights; export into an empty directory")


@torch.no_grad()
def export_hf_weights(model, desc: ModelDesc, path: str | Path, *, dtypes: Optional[dict[str, str]] = None,
                      config_json: Optional[str] = None) -> list[str]:
    """Write `model` as a Hugging Face safetensors checkpoint into `path`; call on every rank.

    `dtypes` maps HF names to safetensors dtypes (e.g. ``LoadReport.dtypes``); missing names
    take :func:`export_dtypes`. Rank 0 also writes ``config.json`` (`config_json` text, default
    ``desc.config``; DeepSeek-V3's router fields spelled out where it lacks them:
    :func:`r1mega.models.hf_config.explicit_router_fields`). Returns the files this rank wrote.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    root = Path(path)
    check_export_target(root)  # on every rank before the first collective: no rank has written yet
    dtypes = {**export_dtypes(desc), **(dtypes or {})}
    shapes = expected_hf_tensors(desc)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = []  # entries this rank takes part in exporting (gathers), in model order
    for entry in model_entries(model, desc):
        if not entry.export:
            continue
        replica = ps.get_expert_data_parallel_rank() if entry.expert else ps.get_data_parallel_rank()
        if replica == 0:
            mine.append(entry)
    writes = [e for e in mine if entry_tp_group(e.expert)[1] == 0]
    layout = [(name, dtypes[name], shapes[name]) for e in writes for name in e.hf]

    everyone = [None] * world
    dist.all_gather_object(everyone, [name for name, _, _ in layout])
    all_names = [n for names in everyone for n in names]
    missing = sorted(set(shapes) - set(all_names))
    doubled = sorted({n for n in all_names if all_names.count(n) > 1})
    if missing or doubled:
        raise CheckpointError(f"internal: export would miss {missing[:3]} / duplicate {doubled[:3]}")
    writers = [r for r in range(world) if everyone[r]]
    files = {r: (SINGLE_NAME if len(writers) == 1 else
                 f"model-{i + 1:05d}-of-{len(writers):05d}.safetensors") for i, r in enumerate(writers)}
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    writer = StreamingWriter(root / files[rank], layout) if layout else None
    try:
        for entry in mine:
            chunks = gather_chunks(entry)
            if entry_tp_group(entry.expert)[1] != 0:
                continue
            for name, full in hf_pieces(entry, chunks, desc).items():
                if tuple(full.shape) != shapes[name]:
                    raise CheckpointError(f"internal: exported {name!r} has shape {_fmt_shape(full.shape)}, "
                                          f"expected {_fmt_shape(shapes[name])}")
                writer.write(name, tensor_bytes(full.to(ST_DTYPES[dtypes[name]])))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    if rank == 0:
        if len(writers) > 1:
            weight_map = {n: files[r] for r in writers for n in everyone[r]}
            total = sum(math.prod(shapes[n]) * torch.empty((), dtype=ST_DTYPES[dtypes[n]]).element_size()
                        for n in weight_map)
            atomic_write_text(root / INDEX_NAME, json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        text = config_json if config_json is not None else json.dumps(desc.config, indent=2) + "\n"
        atomic_write_text(root / "config.json", with_explicit_router_fields(text, desc))
    dist.barrier()
    return [files[rank]] if layout else []


# ---------------------------------------------------------------------------------------------
# The other files of a checkpoint directory
# ---------------------------------------------------------------------------------------------
def hf_side_files(root: Path) -> list[Path]:
    """The files of a HF directory that are not weights (config, tokenizer, generation config)."""
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith(".safetensors")
                  and p.name != INDEX_NAME and not p.name.startswith("."))


def copy_files(files: list[Path], dest: Path) -> None:
    """Copy each file into the directory `dest` under its own name (atomically, one by one)."""
    for file in files:
        atomic_write_bytes(dest / file.name, file.read_bytes())

