"""Hugging Face safetensors <-> megatron GPTModel, streaming, for any TP/EP/PP layout.

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

Name mapping (megatron local-spec names; Transformer Engine's fused-norm names are accepted too)::

    embedding.word_embeddings.weight             model.embed_tokens.weight
    output_layer.weight                          lm_head.weight (tied: not exported)
    decoder.final_layernorm.weight               model.norm.weight
    decoder.layers.L.input_layernorm.weight      model.layers.L.input_layernorm.weight
    decoder.layers.L.pre_mlp_layernorm.weight    model.layers.L.post_attention_layernorm.weight
    ...self_attention.linear_proj.weight         ...self_attn.o_proj.weight
    ...self_attention.linear_qkv.{weight,bias}   [q_proj; k_proj; v_proj] interleaved per KV group
    ...self_attention.{q,k}_layernorm.weight     ...self_attn.{q,k}_norm.weight        (Qwen3)
    ...self_attention.linear_q_proj.weight       ...self_attn.q_proj.weight            (MLA)
    ...self_attention.linear_q_down_proj.weight  ...self_attn.q_a_proj.weight          (MLA)
    ...self_attention.q_layernorm.weight         ...self_attn.q_a_layernorm.weight     (MLA)
    ...self_attention.linear_q_up_proj.weight    ...self_attn.q_b_proj.weight          (MLA)
    ...self_attention.linear_kv_down_proj.weight ...self_attn.kv_a_proj_with_mqa.weight (MLA)
    ...self_attention.kv_layernorm.weight        ...self_attn.kv_a_layernorm.weight    (MLA)
    ...self_attention.linear_kv_up_proj.weight   ...self_attn.kv_b_proj.weight         (MLA)
    ...mlp.linear_fc1.weight                     [mlp.gate_proj; mlp.up_proj] per TP rank
    ...mlp.linear_fc2.weight                     ...mlp.down_proj.weight
    ...mlp.router.weight                         ...mlp.gate.weight
    ...mlp.router.expert_bias                    ...mlp.gate.e_score_correction_bias   (DeepSeek-V3)
    ...mlp.experts.local_experts.j.linear_fc{1,2}  ...mlp.experts.E.{gate,up,down}_proj (E global)
    ...mlp.shared_experts.linear_fc{1,2}         ...mlp.shared_experts.{gate,up,down}_proj

Ignored on load (reported, and not exported): DeepSeek-V3's multi-token-prediction layers
(``model.layers.N..`` for N >= num_hidden_layers) and ``rotary_emb.inv_freq`` buffers.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from r1mega.models.hf_config import ModelDesc

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model; the message names the bad tensors."""


# ---------------------------------------------------------------------------------------------
# Reading safetensors headers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the directory
    dtype: str  # safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of one safetensors file, from its header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return {name: TensorInfo(path.name, meta["dtype"], tuple(meta["shape"])) for name, meta in header.items()}


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
            weight_map = json.loads(index_file.read_text())["weight_map"]
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


# ---------------------------------------------------------------------------------------------
# The Hugging Face tensors a model description implies
# ---------------------------------------------------------------------------------------------
def expected_hf_tensors(desc: ModelDesc) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face checkpoint of `desc` holds."""
    h, v = desc.hidden_size, desc.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not desc.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    for layer in range(desc.num_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if desc.mla is not None:
            m, n = desc.mla, desc.num_heads
            if m.q_lora_rank is None:
                out[a + "q_proj.weight"] = (n * m.qk_head_dim, h)
            else:
                out[a + "q_a_proj.weight"] = (m.q_lora_rank, h)
                out[a + "q_a_layernorm.weight"] = (m.q_lora_rank,)
                out[a + "q_b_proj.weight"] = (n * m.qk_head_dim, m.q_lora_rank)
            out[a + "kv_a_proj_with_mqa.weight"] = (m.kv_lora_rank + m.qk_rope_head_dim, h)
            out[a + "kv_a_layernorm.weight"] = (m.kv_lora_rank,)
            out[a + "kv_b_proj.weight"] = (n * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
            out[a + "o_proj.weight"] = (h, n * m.v_head_dim)
        else:
            d, n, g = desc.head_dim, desc.num_heads, desc.num_kv_heads
            out[a + "q_proj.weight"] = (n * d, h)
            out[a + "k_proj.weight"] = (g * d, h)
            out[a + "v_proj.weight"] = (g * d, h)
            if desc.qkv_bias:
                out[a + "q_proj.bias"] = (n * d,)
                out[a + "k_proj.bias"] = (g * d,)
                out[a + "v_proj.bias"] = (g * d,)
            if desc.qk_norm:
                out[a + "q_norm.weight"] = (d,)
                out[a + "k_norm.weight"] = (d,)
            out[a + "o_proj.weight"] = (h, n * d)
        mlp = p + "mlp."
        if desc.is_moe_layer(layer):
            moe = desc.moe
            out[mlp + "gate.weight"] = (moe.num_experts, h)
            if moe.expert_bias:
                out[mlp + "gate.e_score_correction_bias"] = (moe.num_experts,)
            for e in range(moe.num_experts):
                out.update(_swiglu_shapes(f"{mlp}experts.{e}.", h, moe.ffn_hidden_size))
            if moe.shared_ffn_hidden_size:
                out.update(_swiglu_shapes(mlp + "shared_experts.", h, moe.shared_ffn_hidden_size))
        else:
            out.update(_swiglu_shapes(mlp, h, desc.ffn_hidden_size))
    return out


def _swiglu_shapes(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (ffn, hidden), prefix + "up_proj.weight": (ffn, hidden),
            prefix + "down_proj.weight": (hidden, ffn)}


def _ignored(desc: ModelDesc, name: str) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    mtp = desc.config.get("num_nextn_predict_layers") or 0
    if desc.arch == "deepseek_v3" and mtp:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return bool(match) and desc.num_layers <= int(match.group(1)) < desc.num_layers + mtp
    return False


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
        if _ignored(desc, name):
            ignored.append(name)
        else:
            problems.append(f"unexpected tensor {name!r} in {found[name].file}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path} ({desc.arch}): " + "; ".join(problems[:3]) + more)
    return {n: found[n] for n in expected}, ignored


# ---------------------------------------------------------------------------------------------
# megatron parameter <-> Hugging Face tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One megatron tensor of this rank and the Hugging Face tensors it is made of."""

    name: str  # megatron local name (state_dict key)
    tensor: torch.Tensor  # the parameter or buffer itself
    kind: str  # copy | swiglu | qkv
    hf: tuple[str, ...]
    expert: bool
    split_dim: Optional[int]  # tensor-parallel partition dim; None: replicated
    export: bool = True  # False: a tied output layer (its data is the embedding)


_TE_NORM_ALIASES = (  # Transformer Engine fuses norms into the following linear
    (".self_attention.linear_qkv.layer_norm_weight", ".input_layernorm.weight"),
    (".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight"),
    (".self_attention.linear_q_up_proj.layer_norm_weight", ".self_attention.q_layernorm.weight"),
    (".self_attention.linear_kv_up_proj.layer_norm_weight", ".self_attention.kv_layernorm.weight"),
)

_LAYER_RULES = (  # (megatron suffix, kind, HF suffixes); MLA/GQA differences resolved in _map_layer
    ("input_layernorm.weight", "copy", ("input_layernorm.weight",)),
    ("pre_mlp_layernorm.weight", "copy", ("post_attention_layernorm.weight",)),
    ("self_attention.linear_proj.weight", "copy", ("self_attn.o_proj.weight",)),
    ("self_attention.linear_qkv.weight", "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight")),
    ("self_attention.linear_qkv.bias", "qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                               "self_attn.v_proj.bias")),
    ("self_attention.k_layernorm.weight", "copy", ("self_attn.k_norm.weight",)),
    ("self_attention.linear_q_proj.weight", "copy", ("self_attn.q_proj.weight",)),
    ("self_attention.linear_q_down_proj.weight", "copy", ("self_attn.q_a_proj.weight",)),
    ("self_attention.linear_q_up_proj.weight", "copy", ("self_attn.q_b_proj.weight",)),
    ("self_attention.linear_kv_down_proj.weight", "copy", ("self_attn.kv_a_proj_with_mqa.weight",)),
    ("self_attention.linear_kv_up_proj.weight", "copy", ("self_attn.kv_b_proj.weight",)),
    ("self_attention.kv_layernorm.weight", "copy", ("self_attn.kv_a_layernorm.weight",)),
    ("mlp.linear_fc1.weight", "swiglu", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("mlp.linear_fc2.weight", "copy", ("mlp.down_proj.weight",)),
    ("mlp.router.weight", "copy", ("mlp.gate.weight",)),
    ("mlp.router.expert_bias", "copy", ("mlp.gate.e_score_correction_bias",)),
    ("mlp.shared_experts.linear_fc1.weight", "swiglu", ("mlp.shared_experts.gate_proj.weight",
                                                       "mlp.shared_experts.up_proj.weight")),
    ("mlp.shared_experts.linear_fc2.weight", "copy", ("mlp.shared_experts.down_proj.weight",)),
)


def _map_layer(desc: ModelDesc, layer: int, suffix: str) -> tuple[str, tuple[str, ...]]:
    """(kind, HF names) of a megatron per-layer tensor `suffix` of global layer `layer`."""
    prefix = f"model.layers.{layer}."
    expert = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", suffix)
    if expert:  # the caller has replaced the local expert index by the global one
        e, fc = expert.groups()
        base = f"{prefix}mlp.experts.{e}."
        if fc == "1":
            return "swiglu", (base + "gate_proj.weight", base + "up_proj.weight")
        return "copy", (base + "down_proj.weight",)
    if suffix == "self_attention.q_layernorm.weight":
        hf = "self_attn.q_a_layernorm.weight" if desc.mla is not None else "self_attn.q_norm.weight"
        return "copy", (prefix + hf,)
    for megatron_suffix, kind, hf in _LAYER_RULES:
        if suffix == megatron_suffix:
            return kind, tuple(prefix + name for name in hf)
    raise CheckpointError(f"internal: no Hugging Face mapping for megatron tensor 'decoder.layers.{layer}.{suffix}'")


_LAYER_PREFIX = re.compile(r"(decoder\.layers\.\d+\.)")
_LOCAL_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.")


def unwrap_model(model):
    """The GPTModel inside megatron/torch wrappers (DDP, Float16Module), which add ``module.``."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def model_entries(model, desc: ModelDesc) -> list[Entry]:
    """This rank's megatron tensors (parameters and persistent buffers) with their HF sources."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = unwrap_model(model)
    layer_of: dict[str, int] = {}  # "decoder.layers.3." -> global layer index
    expert_base: dict[str, int] = {}  # "...mlp.experts." -> global index of local expert 0
    ep_rank = ps.get_expert_model_parallel_rank()
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            layer_of[name + "."] = module.layer_number - 1
        elif isinstance(module, SequentialMLP):
            expert_base[name + "."] = ep_rank * module.num_local_experts
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        canonical = name
        for te_suffix, local_suffix in _TE_NORM_ALIASES:
            if canonical.endswith(te_suffix):
                canonical = canonical[: -len(te_suffix)] + local_suffix
        split_dim = getattr(tensor, "partition_dim", None) if getattr(tensor, "tensor_model_parallel", False) else None
        expert = ".mlp.experts." in canonical
        export = True
        if canonical == "embedding.word_embeddings.weight":
            kind, hf = "copy", ("model.embed_tokens.weight",)
        elif canonical == "decoder.final_layernorm.weight":
            kind, hf = "copy", ("model.norm.weight",)
        elif canonical == "output_layer.weight":
            kind, hf = "copy", ("model.embed_tokens.weight" if desc.tie_embeddings else "lm_head.weight",)
            export = not desc.tie_embeddings
        else:
            match = _LAYER_PREFIX.match(canonical)
            if match is None or match.group(1) not in layer_of:
                raise CheckpointError(f"internal: no Hugging Face mapping for megatron tensor {name!r}")
            prefix = match.group(1)
            suffix = canonical[len(prefix):]
            local = _LOCAL_EXPERT.match(canonical)
            if local is not None:  # local expert index -> global expert index
                global_e = expert_base[local.group(1)] + int(local.group(2))
                suffix = suffix.replace(f"local_experts.{local.group(2)}.", f"local_experts.{global_e}.", 1)
            kind, hf = _map_layer(desc, layer_of[prefix], suffix)
        if kind != "copy" and split_dim not in (None, 0):
            raise CheckpointError(f"internal: megatron tensor {name!r} is split along dim {split_dim}, expected 0")
        entries.append(Entry(name, tensor, kind, hf, expert, split_dim, export))
    return entries


def entry_tp_group(expert: bool):
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_world_size())
    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size())


def gather_chunks(entry: Entry) -> list[torch.Tensor]:
    """This rank's tensor of `entry` and its (expert-)tensor-parallel peers', in rank order
    (collective over that group when the tensor is split; just the local tensor otherwise)."""
    import torch.distributed as dist

    group, _, size = entry_tp_group(entry.expert)
    local = entry.tensor.detach()
    if entry.split_dim is None or size == 1:
        return [local]
    chunks = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(chunks, local.contiguous(), group=group)
    return chunks


def _chunk(n: int, rank: int, size: int, what: str) -> slice:
    if n % size:
        raise CheckpointError(f"{what}: dimension {n} is not divisible by the {size} tensor-parallel ranks")
    step = n // size
    return slice(rank * step, (rank + 1) * step)


def _qkv_geometry(desc: ModelDesc) -> tuple[int, int, int]:
    """(query groups, heads per group, head dim) of GQA attention."""
    return desc.num_kv_heads, desc.num_heads // desc.num_kv_heads, desc.head_dim


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load read: the source dtype of every tensor, and the tensors it ignored."""

    dtypes: dict[str, str] = field(default_factory=dict)  # HF name -> safetensors dtype (F32, BF16, ...)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0  # megatron tensors filled on this rank


class _Reader:
    """Open safetensors files lazily (memory-mapped); read slices of named tensors."""

    def __init__(self, root: Path, tensors: dict[str, TensorInfo]):
        self.root, self.tensors = root, tensors
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def slice(self, name: str, dim: Optional[int] = None, rows: Optional[slice] = None) -> torch.Tensor:
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


def _read_local(entry: Entry, reader: _Reader, desc: ModelDesc) -> torch.Tensor:
    """The rank-local value of one megatron tensor, read from its HF slices."""
    if entry.split_dim is None:
        parts = [reader.slice(name) for name in entry.hf]
        if entry.kind == "copy":
            return parts[0]
        if entry.kind == "swiglu":
            return torch.cat(parts, dim=0)
        return _interleave_qkv(parts, desc)
    _, rank, size = entry_tp_group(entry.expert)
    dim = entry.split_dim
    if entry.kind == "copy":
        n = reader.tensors[entry.hf[0]].shape[dim]
        return reader.slice(entry.hf[0], dim, _chunk(n, rank, size, entry.hf[0]))
    if entry.kind == "swiglu":
        return torch.cat([reader.slice(name, 0, _chunk(reader.tensors[name].shape[0], rank, size, name))
                          for name in entry.hf], dim=0)
    groups, per_group, head_dim = _qkv_geometry(desc)
    owned = _chunk(groups, rank, size, entry.hf[1])
    q = reader.slice(entry.hf[0], 0, slice(owned.start * per_group * head_dim, owned.stop * per_group * head_dim))
    k = reader.slice(entry.hf[1], 0, slice(owned.start * head_dim, owned.stop * head_dim))
    v = reader.slice(entry.hf[2], 0, slice(owned.start * head_dim, owned.stop * head_dim))
    return _interleave_qkv([q, k, v], desc)


def _interleave_qkv(parts: list[torch.Tensor], desc: ModelDesc) -> torch.Tensor:
    """[q; k; v] rows (a contiguous run of query groups) -> megatron's per-group [q_g, k_g, v_g]."""
    _, per_group, head_dim = _qkv_geometry(desc)
    q, k, v = parts
    groups = k.shape[0] // head_dim
    rest = tuple(q.shape[1:])
    return torch.cat([q.reshape(groups, per_group * head_dim, *rest), k.reshape(groups, head_dim, *rest),
                      v.reshape(groups, head_dim, *rest)], dim=1).reshape(-1, *rest)


def _split_qkv(local: torch.Tensor, desc: ModelDesc) -> list[torch.Tensor]:
    """Inverse of _interleave_qkv: megatron rows of some query groups -> (q, k, v) rows."""
    _, per_group, head_dim = _qkv_geometry(desc)
    rest = tuple(local.shape[1:])
    grouped = local.reshape(-1, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


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
    with _Reader(root, tensors) as reader:
        for entry in model_entries(model, desc):
            value = _read_local(entry, reader, desc)
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
def export_dtypes(desc: ModelDesc) -> dict[str, str]:
    """The dtype of every exported tensor when no source dtypes are known: the config's dtype,
    fp32 for DeepSeek-V3's expert bias (transformers keeps it in fp32)."""
    base = _DTYPE_NAMES[desc.dtype]
    return {name: "F32" if name.endswith("e_score_correction_bias") else base for name in expected_hf_tensors(desc)}


def hf_pieces(entry: Entry, chunks: list[torch.Tensor], desc: ModelDesc) -> dict[str, torch.Tensor]:
    """Full HF tensors from the tensor-parallel chunks (in rank order) of one megatron tensor."""
    if entry.kind == "copy":
        return {entry.hf[0]: chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=entry.split_dim)}
    if entry.kind == "swiglu":
        halves = [c.chunk(2, dim=0) for c in chunks]
        return {entry.hf[0]: torch.cat([h[0] for h in halves]), entry.hf[1]: torch.cat([h[1] for h in halves])}
    split = [_split_qkv(c, desc) for c in chunks]
    return {name: torch.cat([s[i] for s in split]) for i, name in enumerate(entry.hf)}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class _StreamingWriter:
    """A safetensors file written header first, then one tensor at a time, renamed when complete."""

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


def _check_export_target(root: Path) -> None:
    if (root / INDEX_NAME).exists() or any(root.glob("*.safetensors")):
        raise CheckpointError(f"{root}: already holds safetensors weights; export into an empty directory")


@torch.no_grad()
def export_hf_weights(model, desc: ModelDesc, path: str | Path, *, dtypes: Optional[dict[str, str]] = None,
                      config_json: Optional[str] = None) -> list[str]:
    """Write `model` as a Hugging Face safetensors checkpoint into `path`; call on every rank.

    `dtypes` maps HF names to safetensors dtypes (e.g. ``LoadReport.dtypes``); missing names
    take :func:`export_dtypes`. Rank 0 also writes ``config.json`` (`config_json` text, default
    ``desc.config``). Returns the files this rank wrote.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    root = Path(path)
    _check_export_target(root)  # on every rank before the first collective: no rank has written yet
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

    writer = _StreamingWriter(root / files[rank], layout) if layout else None
    try:
        for entry in mine:
            chunks = gather_chunks(entry)
            if entry_tp_group(entry.expert)[1] != 0:
                continue
            for name, full in hf_pieces(entry, chunks, desc).items():
                if tuple(full.shape) != shapes[name]:
                    raise CheckpointError(f"internal: exported {name!r} has shape {_fmt_shape(full.shape)}, "
                                          f"expected {_fmt_shape(shapes[name])}")
                writer.write(name, _tensor_bytes(full.to(ST_DTYPES[dtypes[name]])))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    if rank == 0:
        from r1mega.utils.io import atomic_write_text

        if len(writers) > 1:
            weight_map = {n: files[r] for r in writers for n in everyone[r]}
            total = sum(math.prod(shapes[n]) * torch.empty((), dtype=ST_DTYPES[dtypes[n]]).element_size()
                        for n in weight_map)
            atomic_write_text(root / INDEX_NAME, json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        atomic_write_text(root / "config.json",
                          config_json if config_json is not None else json.dumps(desc.config, indent=2) + "\n")
    dist.barrier()
    return [files[rank]] if layout else []


# ---------------------------------------------------------------------------------------------
# Whole-directory conversion (the `r1mega convert` command)
# ---------------------------------------------------------------------------------------------
MEGATRON_META = "r1mega_megatron.json"
MEGATRON_WEIGHTS = "weights"  # megatron dist_checkpointing directory inside a converted checkpoint
HF_FILES = "hf"  # the source's non-weight files (config.json verbatim, tokenizer, ...)


def hf_side_files(root: Path) -> list[Path]:
    """The files of a HF directory that are not weights (config, tokenizer, generation config)."""
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith(".safetensors")
                  and p.name != INDEX_NAME and not p.name.startswith("."))


def copy_files(files: list[Path], dest: Path) -> None:
    from r1mega.utils.io import atomic_write_bytes

    for file in files:
        atomic_write_bytes(dest / file.name, file.read_bytes())


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, parallel, *, dtype: Optional[str] = None) -> dict:
    """HF safetensors directory -> megatron distributed checkpoint; call on every rank.

    `out_dir` receives ``weights/`` (megatron ``dist_checkpointing`` of the model's sharded state
    dict: loadable into any layout), ``hf/`` (the source's config.json verbatim and its other
    non-weight files) and ``r1mega_megatron.json`` (source dtypes per tensor, the parameter dtype,
    the layout written from, ignored tensors). The source is checked before any process group or
    model is set up. Returns the metadata written.
    """
    import torch.distributed as dist
    from megatron.core import __version__ as mcore_version
    from megatron.core import dist_checkpointing

    from r1mega.models.build import build_model
    from r1mega.models.hf_config import describe_hf_model
    from r1mega.parallel.state import init_parallel
    from r1mega.utils.io import atomic_write_text

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    desc = describe_hf_model(hf_dir)
    check_hf_checkpoint(hf_dir, desc)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: not empty; convert into a new directory")
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=dtype)
    report = load_hf_weights(model, desc, hf_dir)
    meta = {"format": 1, "arch": desc.arch, "params_dtype": dtype or desc.dtype, "dtypes": report.dtypes,
            "ignored": report.ignored, "megatron_core": mcore_version,
            "written_with": {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "etp": parallel.expert_tp}}
    if dist.get_rank() == 0:
        (out_dir / MEGATRON_WEIGHTS).mkdir(parents=True, exist_ok=True)
        copy_files(hf_side_files(hf_dir), out_dir / HF_FILES)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(out_dir / MEGATRON_WEIGHTS))
    if dist.get_rank() == 0:
        atomic_write_text(out_dir / MEGATRON_META, json.dumps(meta, indent=2) + "\n")
    dist.barrier()
    return meta


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, parallel) -> list[str]:
    """A checkpoint written by convert_hf_to_megatron -> HF safetensors directory; every rank.

    The layout may differ from the one it was written with. The source's config.json and other
    non-weight files are copied back verbatim; tensors are written in their source dtypes.
    Returns the weight files this rank wrote.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from r1mega.models.build import build_model
    from r1mega.models.hf_config import describe_hf_model
    from r1mega.parallel.state import init_parallel

    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    meta_file = megatron_dir / MEGATRON_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{megatron_dir}: not a checkpoint written by `r1mega convert --to-megatron` "
                              f"({meta_file.name}: {err})") from None
    desc = describe_hf_model(megatron_dir / HF_FILES)
    _check_export_target(out_dir)
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=meta["params_dtype"])
    state = dist_checkpointing.load(model.sharded_state_dict(), str(megatron_dir / MEGATRON_WEIGHTS))
    model.load_state_dict(state)
    side = hf_side_files(megatron_dir / HF_FILES)
    config_text = (megatron_dir / HF_FILES / "config.json").read_text()
    written = export_hf_weights(model, desc, out_dir, dtypes=meta["dtypes"], config_json=config_text)
    if dist.get_rank() == 0:
        copy_files([f for f in side if f.name != "config.json"], out_dir)
    dist.barrier()
    return written


def convert_hf_to_hf(hf_dir: str | Path, out_dir: str | Path, parallel, *, dtype: Optional[str] = None) -> list[str]:
    """HF directory -> megatron model in memory (this layout) -> HF directory; every rank.

    Checks a layout end to end and rewrites the weight files (one per writing rank); the other
    files are copied verbatim. Returns the weight files this rank wrote.
    """
    import torch.distributed as dist

    from r1mega.models.build import build_model
    from r1mega.models.hf_config import describe_hf_model
    from r1mega.parallel.state import init_parallel

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    desc = describe_hf_model(hf_dir)
    check_hf_checkpoint(hf_dir, desc)
    _check_export_target(out_dir)
    init_parallel(parallel)
    model = build_model(desc, parallel, dtype=dtype)
    report = load_hf_weights(model, desc, hf_dir)
    written = export_hf_weights(model, desc, out_dir, dtypes=report.dtypes,
                                config_json=(hf_dir / "config.json").read_text())
    if dist.get_rank() == 0:
        copy_files([f for f in hf_side_files(hf_dir) if f.name != "config.json"], out_dir)
    dist.barrier()
    return written
