"""The safetensors format, streamed: headers, a directory's tensors, slice reads, header-first writes.

Nothing here reads a whole file into memory: :func:`read_safetensors_header` and
:func:`scan_hf_checkpoint` read headers only, :class:`SliceReader` memory-maps the files and reads
the slices asked for, and :class:`StreamingWriter` writes the header first and then one tensor at a
time. What the tensors mean (Hugging Face names, megatron shards) is :mod:`r1mega.models.hf_mapping`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from r1mega.models.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's name -> file map
SINGLE_NAME = "model.safetensors"  # the one file of an unsharded checkpoint

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}  # torch dtype -> safetensors dtype name


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint directory, as its file's header describes it."""

    file: str  # file name inside the directory
    dtype: str  # safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]


# Bytes per element of every dtype the safetensors format defines (its spec), for the checks below.
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_MAX_HEADER = 100 * 2**20


def _load_json(raw: bytes, what: str):
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 ({err.reason} at byte {err.start})") from None


def _check_entry(name, meta) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or ValueError saying what is wrong."""
    if not isinstance(meta, dict):
        raise ValueError(f"tensor {name!r}: an entry must be an object, got {type(meta).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise ValueError(f"tensor {name!r}: no {', '.join(missing)}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    if offsets[1] - offsets[0] != math.prod(shape) * ST_ITEMSIZE[dtype]:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                         f"its {dtype} shape {shape} needs {math.prod(shape) * ST_ITEMSIZE[dtype]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of one safetensors file, from its header only.

    The header is checked as the format requires (and as the safetensors library checks when it
    opens the file): a JSON object of ``{dtype, shape, data_offsets}`` entries whose byte ranges
    match their shapes and dtypes and tile the data section exactly, which ends the file, and a
    ``__metadata__`` of strings. Anything else is a CheckpointError naming the file and the entry.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{len(head)} bytes, shorter than the 8-byte header size")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            raw = f.read(size)
            if len(raw) < size:
                raise ValueError(f"the header of {size} bytes is cut off at {len(raw)}")
            data_size = f.seek(0, 2) - 8 - size
        header = _load_json(raw, "the header")
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise ValueError("__metadata__ must map strings to strings")
        entries = {name: _check_entry(name, meta) for name, meta in header.items()}
        covered = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != covered:
                raise ValueError(f"tensor {name!r}: data_offsets start at {begin}, the previous tensor ends at "
                                 f"{covered} (tensors must tile the data section)")
            covered = end
        if covered != data_size:
            raise ValueError(f"the tensors cover {covered} bytes of data, the file holds {data_size}"
                             + (" (truncated)" if data_size < covered else ""))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return {name: TensorInfo(path.name, dtype, shape) for name, (dtype, shape, _, _) in entries.items()}


def scan_hf_checkpoint(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors checkpoint directory (sharded with its index, or not).

    With an index, the index and the shards must agree: a tensor listed for a file that lacks
    it, or a tensor in a shard that the index does not list, is an error naming it.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index_file = root / INDEX_NAME
    tensors: dict[str, TensorInfo] = {}
    if index_file.is_file():
        try:
            weight_map = _load_json(index_file.read_bytes(), "the index")["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(f, str) and f and "/" not in f
                                                         for f in weight_map.values())):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file}: not a safetensors index ({err})") from None
        for file in sorted(set(weight_map.values())):
            if not (root / file).is_file():
                missing = sorted(n for n, f in weight_map.items() if f == file)
                raise CheckpointError(f"{root}: {INDEX_NAME} lists tensor {missing[0]!r} in {file}, "
                                      "which does not exist")
            header = read_safetensors_header(root / file)
            for name, info in header.items():
                if weight_map.get(name) != file:
                    raise CheckpointError(f"{root / file}: tensor {name!r} is not listed for this file "
                                          f"in {INDEX_NAME}")
                tensors[name] = info
        for name, file in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{root}: {INDEX_NAME} lists tensor {name!r} in {file}, "
                                      "which does not hold it")
        return tensors
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors weights (other weight formats are not supported)")
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{root}: tensor {name!r} is in both {tensors[name].file} and {file.name}")
            tensors[name] = info
    return tensors


class SliceReader:
    """Open safetensors files lazily (memory-mapped); read slices of named tensors.

    `tensors` is the directory's listing (:func:`scan_hf_checkpoint`); use it as a context manager,
    which closes the files it opened.
    """

    def __init__(self, root: Path, tensors: dict[str, TensorInfo]):
        self.root, self.tensors = root, tensors
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def slice(self, name: str, dim: Optional[int] = None, rows: Optional[slice] = None) -> torch.Tensor:
        """Tensor `name`, or only its index range `rows` along dimension `dim`."""
        from safetensors import safe_open

        file = self.tensors[name].file
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(str(self.root / file), framework="pt"))
        handle = self._open[file].get_slice(name)
        if dim is None or rows is None:
            return handle[:]
        index = [slice(None)] * len(self.tensors[name].shape)
        index[dim] = rows
        return handle[tuple(index)]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of `tensor` as safetensors stores them (C order, native little-endian), from
    any device: a CUDA tensor is copied to host memory first (numpy reads host memory only)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return flat.cpu().numpy().tobytes()


class StreamingWriter:
    """A safetensors file written header first, then one tensor at a time, renamed when complete.

    `layout` lists (name, safetensors dtype, shape) in file order; :meth:`write` must then be called
    in that order with each tensor's bytes (:func:`tensor_bytes`), then :meth:`close` (fsync and
    rename into place) or, on failure, :meth:`abort` (the partial file is removed).
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.sizes = {}
        for name, dtype, shape in layout:
            size = math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        self.order = [name for name, _, _ in layout]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by close() or abort())
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, data: bytes) -> None:
        if self.order[self.next] != name or len(data) != self.sizes[name]:
            raise RuntimeError(f"internal: writing {name!r} out of order or with the wrong size")
        self.file.write(data)
        self.next += 1

    def close(self) -> None:
        import os

        if self.next != len(self.order):
            raise RuntimeError(f"internal: {self.path} closed after {self.next} of {len(self.order)} tensors")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

