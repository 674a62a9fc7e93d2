"""A Hugging Face ``config.json`` as r1mega's typed model description, or a refusal that names why.

:func:`describe_hf_config` reads the keys each supported family uses and returns a frozen
:class:`ModelDesc`; everything r1mega builds (megatron's TransformerConfig, the tensor-name map of
the checkpoint converter) is derived from it, never from the raw dict. Anything the megatron model
could not reproduce exactly is refused by name with :class:`UnsupportedModelError`: an unknown
architecture, a rope scaling type, sliding-window attention, quantised weights, a router variant.

Supported families (``ModelDesc.arch``):

* ``deepseek_v3`` — multi-latent attention (MLA), sigmoid router with the aux-loss-free expert bias
  (``e_score_correction_bias``), group-limited top-k, routed scaling factor, shared experts, the
  first ``first_k_dense_replace`` layers dense. RoPE: default or YaRN.
* ``qwen3_moe`` — softmax top-k router (``norm_topk_prob`` either way), q/k RMSNorm on the head dim,
  ``decoder_sparse_step``/``mlp_only_layers`` layer pattern.
* ``qwen2`` — dense, q/k/v biases, optionally tied embeddings (Qwen2 and Qwen2.5).
* ``llama`` — dense Llama-3 (rope scaling ``llama3`` with megatron's fixed constants, or none).
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

SUPPORTED_ARCHS = ("deepseek_v3", "qwen3_moe", "qwen2", "llama")
_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}
# Bounds on the sizes that r1mega loops over (per layer, per expert) when it describes, checks or
# builds a model: far above any published model, low enough that a typo cannot make it hang.
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
_MAX_INT = 2**63 - 1  # every other size: it must fit a tensor dimension

# Values quoted in messages are cut to about this many characters (a huge value must not make a
# huge message) and nested containers to a few levels.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_shown = _SHOWN.repr


class UnsupportedModelError(ValueError):
    """A config.json r1mega cannot build exactly; the message names the key and value."""


@dataclass(frozen=True)
class RopeDesc:
    """Rotary position embedding. ``kind``: default | linear | llama3 | yarn."""

    theta: float
    kind: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None  # yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 0.0  # yarn


@dataclass(frozen=True)
class MLADesc:
    """DeepSeek multi-latent attention dimensions; ``q_lora_rank`` None means a plain q projection."""

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEDesc:
    """Routed (and shared) experts and their router, as megatron names the choices."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    layers: tuple[bool, ...]  # per layer: True = MoE, False = dense MLP
    score_function: Literal["softmax", "sigmoid"]
    pre_softmax: bool  # softmax over all experts then top-k (no renormalisation)
    expert_bias: bool  # aux-loss-free balancing bias (DeepSeek-V3 e_score_correction_bias)
    num_groups: Optional[int] = None  # group-limited top-k
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None  # routed_scaling_factor
    shared_ffn_hidden_size: int = 0  # 0: no shared experts
    router_fp32: bool = False  # router logits in fp32 (DeepSeek-V3) or the model dtype (Qwen3-MoE)


@dataclass(frozen=True)
class ModelDesc:
    """Everything r1mega needs to build a model and map its checkpoint; derived from config.json."""

    arch: Literal["deepseek_v3", "qwen3_moe", "qwen2", "llama"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # attention head dim (MLA: unused by the attention, kept for reference)
    ffn_hidden_size: int  # dense-layer FFN width
    norm_eps: float
    rope: RopeDesc
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: Literal["float32", "bfloat16", "float16"]
    init_std: float = 0.02
    mla: Optional[MLADesc] = None
    moe: Optional[MoEDesc] = None
    config: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json as read

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.layers[layer]


# ---------------------------------------------------------------------------------------------
def _config_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def load_hf_config(path: str | Path) -> dict:
    """The config.json of a model directory (or the file itself) as a dict."""
    file = _config_file(path)
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UnsupportedModelError(f"{file}: no config.json") from None
    except (OSError, ValueError) as err:  # also not UTF-8, an integer of too many digits
        raise UnsupportedModelError(f"{file}: cannot read a JSON config ({err})") from None
    except RecursionError:
        raise UnsupportedModelError(f"{file}: cannot read a JSON config (nested too deeply)") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{file}: expected a JSON object")
    return data


def describe_hf_model(path: str | Path) -> ModelDesc:
    """`describe_hf_config` of the config.json in a model directory; its refusals name the file
    (``DIR/config.json (arch): key=value ...``)."""
    file = _config_file(path)
    cfg = load_hf_config(file)
    try:
        return describe_hf_config(cfg)
    except UnsupportedModelError as err:
        message = str(err)
        if message.startswith("config.json"):
            message = message[len("config.json"):]
        raise UnsupportedModelError(f"{file}{message}") from None


_MISSING = object()


class _Reader:
    def __init__(self, cfg: dict, arch: str):
        self.cfg, self.arch = cfg, arch

    def get(self, key: str, default: Any = _MISSING, *, aliases: tuple[str, ...] = ()) -> Any:
        for name in (key, *aliases):
            if name in self.cfg and self.cfg[name] is not None:
                return self.cfg[name]
        if default is _MISSING:
            raise UnsupportedModelError(f"config.json ({self.arch}): required key {key!r} is missing")
        return default

    def int(self, key: str, default: Any = _MISSING, *, aliases: tuple[str, ...] = (), ge: int = 1,
            le: int = _MAX_INT) -> int:
        return self.integer(key, self.get(key, default, aliases=aliases), ge=ge, le=le)

    def integer(self, key: str, value: Any, *, ge: int = 1, le: int = _MAX_INT) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < ge:
            raise UnsupportedModelError(f"config.json ({self.arch}): {key}={_shown(value)} must be an integer >= {ge}")
        if value > le:
            raise UnsupportedModelError(f"config.json ({self.arch}): {key}={_shown(value)} must be an integer "
                                        f">= {ge} and <= {le}")
        return value

    def float(self, key: str, default: Any = _MISSING, *, aliases: tuple[str, ...] = ()) -> float:
        return self.number(key, self.get(key, default, aliases=aliases))

    def number(self, key: str, value: Any) -> float:
        """`value` (of `key`) as a float: a JSON number, finite."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if math.isfinite(number := float(value)):
                    return number
            except OverflowError:  # an integer past the largest float
                pass
        raise UnsupportedModelError(f"config.json ({self.arch}): {key}={_shown(value)} must be a finite number")

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise UnsupportedModelError(f"config.json ({self.arch}): {key}={_shown(value)} must be true or false")
        return value

    def refuse(self, key: str, value: Any, why: str) -> None:
        raise UnsupportedModelError(f"config.json ({self.arch}): {key}={_shown(value)} is not supported: {why}")

    def require(self, key: str, allowed: tuple, default: Any, why: str) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            self.refuse(key, value, why)
        return value


def model_type_of(cfg: dict) -> str:
    """The family of a config.json: its model_type, checked against its architectures."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type in SUPPORTED_ARCHS:
        return model_type
    shown = f"model_type {_shown(model_type)}" + (f", architectures {_shown(archs)}" if archs else "")
    raise UnsupportedModelError(
        f"config.json: {shown} is not supported; supported model_type: {', '.join(SUPPORTED_ARCHS)}")


def describe_hf_config(cfg: dict) -> ModelDesc:
    """The ModelDesc of a Hugging Face config dict, or UnsupportedModelError naming the problem."""
    arch = model_type_of(cfg)
    r = _Reader(cfg, arch)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(cfg["quantization_config"], dict) else "?"
        r.refuse("quantization_config", f"quant_method={method}", "quantised checkpoints must be dequantised first")
    act = r.get("hidden_act", "silu", aliases=("hidden_activation",))
    if act != "silu":
        r.refuse("hidden_act", act, "only silu (SwiGLU) MLPs are supported")
    if r.bool("use_sliding_window", False):
        r.refuse("use_sliding_window", True, "sliding-window attention is not supported")
    layer_types = r.get("layer_types", None)
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        r.refuse("layer_types", layer_types, "expected a list of layer type names")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        r.refuse("layer_types", sorted(set(layer_types)), "only full_attention layers are supported")
    if r.get("pretraining_tp", 1) != 1:
        r.refuse("pretraining_tp", cfg["pretraining_tp"], "only 1 is supported")

    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    layers = r.int("num_hidden_layers", le=MAX_LAYERS)
    kv_heads = r.int("num_key_value_heads", heads)
    if heads % kv_heads:
        r.refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    head_dim = r.int("head_dim", hidden // heads) if arch != "deepseek_v3" else hidden // heads
    raw_dtype = r.get("dtype", None, aliases=("torch_dtype",)) or "float32"
    if not isinstance(raw_dtype, str) or raw_dtype not in _DTYPES:
        r.refuse("dtype", raw_dtype, f"expected one of {', '.join(sorted(set(_DTYPES.values())))}")
    common = dict(
        arch=arch, vocab_size=r.int("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, ffn_hidden_size=r.int("intermediate_size"),
        norm_eps=r.float("rms_norm_eps", 1e-6), max_position_embeddings=r.int("max_position_embeddings", 4096),
        tie_embeddings=r.bool("tie_word_embeddings", False), dtype=_DTYPES[raw_dtype],
        init_std=r.float("initializer_range", 0.02), config=cfg,
    )
    if arch == "deepseek_v3":
        return _deepseek_v3(r, common)
    if arch == "qwen3_moe":
        return _qwen3_moe(r, common)
    if arch == "qwen2":
        return ModelDesc(**common, rope=_rope(r, mla=False), qkv_bias=True, qk_norm=False)
    # llama
    if r.bool("attention_bias", False):
        r.refuse("attention_bias", True, "biases on q/k/v/o projections are not supported for llama")
    if r.bool("mlp_bias", False):
        r.refuse("mlp_bias", True, "MLP biases are not supported")
    return ModelDesc(**common, rope=_rope(r, mla=False), qkv_bias=False, qk_norm=False)


def _rope_params(r: _Reader) -> dict:
    """rope_parameters (transformers >= 5) or the older rope_theta + rope_scaling keys."""
    params = r.get("rope_parameters", None)
    if params is not None and not isinstance(params, dict):
        r.refuse("rope_parameters", params, "expected an object")
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    scaling = r.get("rope_scaling", None) or {}
    if not isinstance(scaling, dict):
        r.refuse("rope_scaling", scaling, "expected an object")
    merged = {**scaling, "rope_theta": r.get("rope_theta", 10000.0)}
    merged.setdefault("rope_type", scaling.get("type", "default"))
    return merged


def _rope(r: _Reader, *, mla: bool) -> RopeDesc:
    p = _rope_params(r)
    kind = p.get("rope_type", p.get("type", "default"))

    def number(key: str, default: Any = _MISSING) -> float:
        value = p.get(key, default)
        if value is _MISSING or (value is None and default is _MISSING):
            raise UnsupportedModelError(f"config.json ({r.arch}): rope_parameters.{key} is missing "
                                        f"(needed by rope_type {_shown(kind)})")
        return r.number(f"rope_parameters.{key}", value)

    theta = number("rope_theta")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        r.refuse("rope_parameters.partial_rotary_factor", p["partial_rotary_factor"], "only 1.0 is supported")
    if kind == "default":
        return RopeDesc(theta=theta)
    if kind == "linear" and not mla:
        return RopeDesc(theta=theta, kind="linear", factor=number("factor"))
    if kind == "llama3" and not mla:
        # megatron's RotaryEmbedding applies the llama3.1 rule with these constants built in.
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in fixed.items():
            if number(key, value) != value:
                r.refuse(f"rope_parameters.{key}", p.get(key), f"megatron's llama3 rope scaling fixes it at {value:g}")
        return RopeDesc(theta=theta, kind="llama3", factor=number("factor"))
    if kind == "yarn" and mla:
        if p.get("attention_factor") is not None:
            r.refuse("rope_parameters.attention_factor", p["attention_factor"],
                     "an explicit YaRN attention factor is not supported (it is derived from mscale)")
        if p.get("truncate", True) is not True:
            r.refuse("rope_parameters.truncate", p["truncate"], "megatron's YaRN always truncates")
        original = r.integer("rope_parameters.original_max_position_embeddings",
                             p.get("original_max_position_embeddings") or 4096)
        factor = number("factor") if p.get("factor") is not None else r.int("max_position_embeddings") / original
        # transformers: cos/sin scaled by m(mscale)/m(mscale_all_dim) when both are set, else by
        # m(1); the softmax scale by m(mscale_all_dim)^2 when it is set. megatron always uses the
        # ratio and m(mscale_all_dim)^2, so "mscale_all_dim without mscale" has no equivalent.
        mscale, mscale_all_dim = (None if p.get(k) is None else number(k) for k in ("mscale", "mscale_all_dim"))
        if mscale_all_dim and not mscale:
            r.refuse("rope_parameters.mscale", mscale, "YaRN with mscale_all_dim but no mscale has no megatron equivalent")
        if not (mscale and mscale_all_dim):
            mscale, mscale_all_dim = 1.0, 0.0
        return RopeDesc(theta=theta, kind="yarn", factor=factor, original_max_position_embeddings=original,
                        beta_fast=number("beta_fast") if p.get("beta_fast") else 32.0,
                        beta_slow=number("beta_slow") if p.get("beta_slow") else 1.0,
                        mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    where = "multi-latent attention supports default and yarn" if mla else "supported: default, linear, llama3"
    r.refuse("rope_parameters.rope_type", kind, where)
    raise AssertionError  # unreachable


def explicit_router_fields(desc: ModelDesc) -> dict:
    """The router fields a real DeepSeek-V3 config.json spells out, with the values this reader gave
    them ({} for other families). transformers writes none of topk_method / scoring_func, and vLLM
    reads their absence as a softmax router without the correction bias (its deepseek_v2.py), so
    r1mega's exports write them all, and the vLLM engine passes them as overrides."""
    if desc.arch != "deepseek_v3" or desc.moe is None:
        return {}
    moe = desc.moe
    return {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": moe.num_groups or 1,
            "topk_group": moe.group_topk or 1, "norm_topk_prob": True,
            "routed_scaling_factor": moe.scaling_factor if moe.scaling_factor is not None else 1.0}


def with_explicit_router_fields(config_text: str, desc: ModelDesc) -> str:
    """config.json text with :func:`explicit_router_fields` added where missing (the rest as it was)."""
    fields = explicit_router_fields(desc)
    cfg = json.loads(config_text)
    missing = {k: v for k, v in fields.items() if k not in cfg}
    if not missing:
        return config_text
    return json.dumps({**cfg, **missing}, indent=2) + "\n"


def _deepseek_v3(r: _Reader, common: dict) -> ModelDesc:
    if r.get("attention_bias", False):
        r.refuse("attention_bias", True, "MLA projections without biases only")
    if r.get("rope_interleave", True) is not True:
        r.refuse("rope_interleave", r.get("rope_interleave"),
                 "megatron's MLA applies RoPE to interleaved pairs (DeepSeek's layout) only")
    r.require("scoring_func", ("sigmoid",), "sigmoid", "DeepSeek-V3 routers score with sigmoid")
    r.require("topk_method", ("noaux_tc",), "noaux_tc", "only the aux-loss-free noaux_tc router is supported")
    if r.int("moe_layer_freq", 1) != 1:
        r.refuse("moe_layer_freq", r.get("moe_layer_freq"),
                 "transformers' DeepSeek-V3 makes every layer from first_k_dense_replace on an MoE layer")
    layers = common["num_layers"]
    experts = r.int("n_routed_experts", aliases=("num_local_experts",), le=MAX_EXPERTS)
    topk = r.int("num_experts_per_tok")
    groups = r.int("n_group", 1)
    group_topk = r.int("topk_group", 1)
    if experts % groups:
        r.refuse("n_group", groups, f"must divide n_routed_experts={experts}")
    if group_topk > groups:
        r.refuse("topk_group", group_topk, f"must be <= n_group={groups}")
    if groups > 1 and topk // group_topk != 2:
        # transformers (and DeepSeek's reference code) score a group by its top-2 experts; megatron
        # by its top (topk // group_topk): they agree only when that quotient is 2.
        r.refuse("topk_group", group_topk, f"group scoring matches transformers only when "
                 f"num_experts_per_tok // topk_group == 2 (num_experts_per_tok={topk})")
    if topk == 1:
        r.refuse("num_experts_per_tok", 1, "megatron's sigmoid router does not renormalise a single expert's weight")
    if not r.bool("norm_topk_prob", True):
        r.refuse("norm_topk_prob", False, "megatron's sigmoid router always renormalises the top-k weights")
    first_dense = r.int("first_k_dense_replace", 0, ge=0)
    shared = r.int("n_shared_experts", 0, ge=0)
    moe_ffn = r.int("moe_intermediate_size")
    moe = MoEDesc(
        num_experts=experts, topk=topk, ffn_hidden_size=moe_ffn,
        layers=tuple(i >= first_dense for i in range(layers)), score_function="sigmoid",
        pre_softmax=False, expert_bias=True,
        num_groups=groups if groups > 1 else None, group_topk=group_topk if groups > 1 else None,
        scaling_factor=r.float("routed_scaling_factor", 1.0), shared_ffn_hidden_size=shared * moe_ffn,
        router_fp32=True,
    )
    mla = MLADesc(q_lora_rank=r.get("q_lora_rank", None), kv_lora_rank=r.int("kv_lora_rank"),
                  qk_nope_head_dim=r.int("qk_nope_head_dim"), qk_rope_head_dim=r.int("qk_rope_head_dim"),
                  v_head_dim=r.int("v_head_dim"))
    if mla.q_lora_rank is not None:
        r.int("q_lora_rank")
    if mla.qk_rope_head_dim % 2:
        r.refuse("qk_rope_head_dim", mla.qk_rope_head_dim, "must be even")
    r.int("num_nextn_predict_layers", 0, ge=0, le=MAX_LAYERS)  # read by the checkpoint check (the MTP layers)
    rope = _rope(r, mla=True)
    if rope.kind == "yarn" and not math.isfinite(rope.factor):
        r.refuse("rope_parameters.factor", rope.factor, "must be finite")
    return ModelDesc(**{**common, "head_dim": mla.qk_head_dim}, rope=rope, qkv_bias=False, qk_norm=True,
                     mla=mla, moe=moe if any(moe.layers) else None)


def _qwen3_moe(r: _Reader, common: dict) -> ModelDesc:
    if r.get("attention_bias", False):
        r.refuse("attention_bias", True, "attention biases are not supported for qwen3_moe")
    layers = common["num_layers"]
    experts = r.int("num_experts", aliases=("num_local_experts",), ge=0, le=MAX_EXPERTS)
    step = r.int("decoder_sparse_step", 1)
    dense_only = r.get("mlp_only_layers", []) or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense_only):
        r.refuse("mlp_only_layers", dense_only, "expected a list of layer indices")
    dense_only = set(dense_only)
    pattern = tuple(experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(layers))
    if r.get("shared_expert_intermediate_size", 0):
        r.refuse("shared_expert_intermediate_size", r.get("shared_expert_intermediate_size"),
                 "qwen3_moe has no shared experts")
    moe = None
    if any(pattern):
        norm = r.bool("norm_topk_prob", False)
        moe = MoEDesc(num_experts=experts, topk=r.int("num_experts_per_tok"),
                      ffn_hidden_size=r.int("moe_intermediate_size"), layers=pattern,
                      score_function="softmax", pre_softmax=not norm, expert_bias=False)
    return ModelDesc(**common, rope=_rope(r, mla=False), qkv_bias=False, qk_norm=True, moe=moe)
