"""Hugging Face <-> megatron GPTModel: tensor names, shapes, and the pieces of tensor-parallel shards.

:func:`expected_hf_tensors` lists what a Hugging Face checkpoint of a model holds;
:func:`model_entries` pairs each of this rank's megatron tensors with the HF tensors it is made
of (:class:`Entry`); :func:`read_local_tensor` assembles a rank-local tensor from HF slices (for
loading) and :func:`hf_pieces` full HF tensors from the tensor-parallel chunks of one megatron
tensor (for export and the weight stream). No file is touched here: reading and writing are
:mod:`r1mega.models.safetensors_io`'s, whole directories :mod:`r1mega.models.hf_checkpoint`'s.

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
    ...mlp.experts.linear_fc{1,2}.weightj        the same (grouped-GEMM experts, TEGroupedMLP)
    ...mlp.shared_experts.linear_fc{1,2}         ...mlp.shared_experts.{gate,up,down}_proj

Ignored on load (reported, and not exported): DeepSeek-V3's multi-token-prediction layers
(``model.layers.N..`` for N >= num_hidden_layers) and ``rotary_emb.inv_freq`` buffers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from r1mega.models.build import unwrap_model
from r1mega.models.errors import CheckpointError
from r1mega.models.hf_config import ModelDesc

_ST_DTYPE_OF = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # model dtype -> safetensors name


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


def is_ignored_hf_tensor(desc: ModelDesc, name: str) -> bool:
    """Whether a HF tensor outside :func:`expected_hf_tensors` is skipped on load rather than refused:
    rotary ``inv_freq`` buffers and DeepSeek-V3's multi-token-prediction layers (never exported)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    mtp = desc.config.get("num_nextn_predict_layers") or 0
    if desc.arch == "deepseek_v3" and mtp:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return bool(match) and desc.num_layers <= int(match.group(1)) < desc.num_layers + mtp
    return False


def export_dtypes(desc: ModelDesc) -> dict[str, str]:
    """The dtype of every exported tensor when no source dtypes are known: the config's dtype,
    fp32 for DeepSeek-V3's expert bias (transformers keeps it in fp32)."""
    base = _ST_DTYPE_OF[desc.dtype]
    return {name: "F32" if name.endswith("e_score_correction_bias") else base for name in expected_hf_tensors(desc)}


# ---------------------------------------------------------------------------------------------
# megatron tensors <-> Hugging Face tensors
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
_GROUPED_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)linear_fc([12])\.weight(\d+)")
# Grouped linears carry no tensor-parallel tags (Transformer Engine's do not): fc1 is column-parallel
# (rows split over expert TP), fc2 row-parallel (columns split).
_GROUPED_SPLIT_DIM = {"1": 0, "2": 1}
_LOCAL_EXPERT = re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.")


def model_entries(model, desc: ModelDesc) -> list[Entry]:
    """This rank's megatron tensors (parameters and persistent buffers) with their HF sources."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = unwrap_model(model)
    layer_of: dict[str, int] = {}  # "decoder.layers.3." -> global layer index
    expert_base: dict[str, int] = {}  # "...mlp.experts." -> global index of local expert 0
    ep_rank = ps.get_expert_model_parallel_rank()
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            layer_of[name + "."] = module.layer_number - 1
        elif isinstance(module, (SequentialMLP, TEGroupedMLP)):
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
        grouped = _GROUPED_EXPERT.fullmatch(canonical)
        if grouped is not None:  # one layout for both expert modules from here on
            prefix, fc, j = grouped.groups()
            canonical = f"{prefix}local_experts.{j}.linear_fc{fc}.weight"
            split_dim = _GROUPED_SPLIT_DIM[fc]
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
    """(group, rank, size) of the tensor-parallel group that splits a tensor: the expert-TP group
    for experts, the TP group otherwise."""
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


def _tp_rows(n: int, rank: int, size: int, what: str) -> slice:
    """The rows of `rank` when `n` rows are split evenly over `size` tensor-parallel ranks."""
    if n % size:
        raise CheckpointError(f"{what}: dimension {n} is not divisible by the {size} tensor-parallel ranks")
    step = n // size
    return slice(rank * step, (rank + 1) * step)


def _qkv_geometry(desc: ModelDesc) -> tuple[int, int, int]:
    """(query groups, heads per group, head dim) of GQA attention."""
    return desc.num_kv_heads, desc.num_heads // desc.num_kv_heads, desc.head_dim


# ---------------------------------------------------------------------------------------------
# Hugging Face tensors <-> rank-local megatron tensors
# ---------------------------------------------------------------------------------------------
class SliceSource(Protocol):
    """What :func:`read_local_tensor` reads from: r1mega.models.safetensors_io.SliceReader."""

    tensors: dict  # HF name -> an object whose .shape is the full tensor's

    def slice(self, name: str, dim: Optional[int] = None, rows: Optional[slice] = None) -> torch.Tensor: ...


def read_local_tensor(entry: Entry, reader: SliceSource, desc: ModelDesc) -> torch.Tensor:
    """The rank-local value of one megatron tensor, read from its HF slices: only this rank's rows
    of a tensor-parallel split, fused q/k/v and gate/up laid out as megatron keeps them."""
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
        return reader.slice(entry.hf[0], dim, _tp_rows(n, rank, size, entry.hf[0]))
    if entry.kind == "swiglu":
        return torch.cat([reader.slice(name, 0, _tp_rows(reader.tensors[name].shape[0], rank, size, name))
                          for name in entry.hf], dim=0)
    groups, per_group, head_dim = _qkv_geometry(desc)
    owned = _tp_rows(groups, rank, size, entry.hf[1])
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


def hf_pieces(entry: Entry, chunks: list[torch.Tensor], desc: ModelDesc) -> dict[str, torch.Tensor]:
    """Full HF tensors from the tensor-parallel chunks (in rank order) of one megatron tensor."""
    if entry.kind == "copy":
        return {entry.hf[0]: chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=entry.split_dim)}
    if entry.kind == "swiglu":
        halves = [c.chunk(2, dim=0) for c in chunks]
        return {entry.hf[0]: torch.cat([h[0] for h in halves]), entry.hf[1]: torch.cat([h[1] for h in halves])}
    split = [_split_qkv(c, desc) for c in chunks]
    return {name: torch.cat([s[i] for s in split]) for i, name in enumerate(entry.hf)}

