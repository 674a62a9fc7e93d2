"""Workarounds that let megatron-core run where its CUDA/Transformer-Engine assumptions do not hold.

Two groups of patches, each applied at most once per process, each with a comment naming the
failure it fixes (measured on megatron-core 0.16.1, torch 2.13 CPU build, gloo):

* :func:`apply_local_spec_workarounds` — megatron bugs and gaps hit by *anyone* who runs without
  Transformer Engine (the local layer spec), GPU users included: patches 5, 6, 9, 10 and 12. Applied
  whenever megatron's own Transformer-Engine probe says TE is absent.
* :func:`apply_cpu_shim` — the CPU-only part (no CUDA device): patches 1, 2, 3, 4, 7, 8 and 11,
  plus the local-spec group. It also sets ``OMP_NUM_THREADS=1`` and ``TORCH_COMPILE_DISABLE=1``
  unless the environment already chose (megatron's router jit costs ~2 s per process on CPU, and
  two OpenMP threads on shared cores made steps swing 11-705 ms).

Both are guarded by the megatron-core version they were written for (``MEGATRON_VERSION``): on
another version they refuse with :class:`ShimVersionError` unless ``R1MEGA_ALLOW_MEGATRON_VERSION=1``
is set, in which case they warn and apply anyway. :func:`prepare_megatron` is the one entry point
the rest of r1mega calls; it picks the groups for the current machine.

Nothing here imports transformer_engine: whether TE is usable is megatron's own
``megatron.core.extensions.transformer_engine.HAVE_TE`` (read by
``r1mega.models.transformer_config.transformer_engine_available``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

import torch

MEGATRON_VERSION = "0.16.1"
_ALLOW_ENV = "R1MEGA_ALLOW_MEGATRON_VERSION"

_applied: set[str] = set()
_cuda_to_cpu_mode = None  # the process-wide TorchFunctionMode of patch 4, once entered


class ShimVersionError(RuntimeError):
    """The installed megatron-core is not the version these patches were written for."""


def installed_megatron_version() -> str:
    """The installed megatron-core version (from package metadata; megatron is not imported)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source checkout on sys.path
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")


def check_megatron_version(found: str | None = None) -> None:
    """Refuse (ShimVersionError) a megatron-core other than MEGATRON_VERSION, or warn when
    R1MEGA_ALLOW_MEGATRON_VERSION=1."""
    found = installed_megatron_version() if found is None else found
    if found == MEGATRON_VERSION:
        return
    message = (f"r1mega's megatron-core workarounds were written for megatron-core=={MEGATRON_VERSION}, "
               f"found {found}")
    if os.environ.get(_ALLOW_ENV, "") == "1":
        warnings.warn(f"{message}; applying them anyway because {_ALLOW_ENV}=1", RuntimeWarning, stacklevel=3)
        return
    raise ShimVersionError(f"{message}; install megatron-core=={MEGATRON_VERSION} or set {_ALLOW_ENV}=1 "
                           "to try anyway")


def megatron_has_te() -> bool:
    """megatron's own verdict on Transformer Engine (its extension module imports TE when present)."""
    from megatron.core.extensions import transformer_engine as te_ext

    return bool(getattr(te_ext, "HAVE_TE", False))


def applied_patches() -> list[str]:
    """Names of the patch groups applied in this process ('local-spec', 'cpu')."""
    return sorted(_applied)


def prepare_megatron() -> list[str]:
    """Apply what this machine needs before megatron models are built; return the groups applied.

    No CUDA: the CPU shim (which includes the local-spec group). CUDA without Transformer Engine:
    the local-spec group. CUDA with Transformer Engine: nothing.
    """
    if not torch.cuda.is_available():
        apply_cpu_shim()
    elif not megatron_has_te():
        apply_local_spec_workarounds()
    return applied_patches()


# ---------------------------------------------------------------------------------------------
# Local-spec group: megatron without Transformer Engine (GPU users hit these too)
# ---------------------------------------------------------------------------------------------
def apply_local_spec_workarounds() -> None:
    """Patches 5, 6, 9, 10; a no-op when already applied or when Transformer Engine is present."""
    if "local-spec" in _applied:
        return
    check_megatron_version()
    if megatron_has_te():
        _applied.add("local-spec")
        return
    _patch_torch_norm_sequence_parallel()    # 5
    _patch_moe_utils_missing_te_names()      # 6
    _patch_dot_product_attention_channels()  # 9
    _patch_mock_have_te()                    # 10
    _patch_dot_product_attention_thd()       # 12
    _applied.add("local-spec")


def _patch_torch_norm_sequence_parallel() -> None:
    # (5) MoE with TP>1 *requires* sequence_parallel=True (moe_layer.py: "ValueError: During
    #     training, performance may degrade if MoE and tensor parallelism are enabled without also
    #     enabling sequence parallelism"), but the only norm without TE/Apex, WrappedTorchNorm,
    #     refuses it: "AssertionError: sequence parallel not supported by torch LayerNorm".
    #     Fix: build the torch norm under SP as well, and tag its parameters `.sequence_parallel`
    #     as TENorm/FusedLayerNorm do, so that finalize_model_grads all-reduces their gradients
    #     across the TP group.
    import megatron.core.transformer.torch_norm as torch_norm

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported by torch norms"
        assert not config.persist_layer_norm, "persist_layer_norm not supported by torch norms"
        assert not config.memory_efficient_layer_norm, "memory_efficient_layer_norm not supported by torch norms"
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r}: only LayerNorm and RMSNorm are supported")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _patch_moe_utils_missing_te_names() -> None:
    # (6) megatron-core 0.16.1 bug (GPU users without TE too): moe_utils imports te_general_gemm
    #     and the fused_* MoE kernels in a try/except ImportError that does not define them in the
    #     except branch, so RouterGatingLinearFunction.forward's `if te_general_gemm is not None`
    #     raises "NameError: name 'te_general_gemm' is not defined" (moe_utils.py:1192).
    #     Fix: define every missing name as None (what the code already tests for).
    import megatron.core.transformer.moe.moe_utils as moe_utils

    for name in ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss",
                 "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                 "fused_unpermute"):
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _patch_dot_product_attention_channels() -> None:
    # (9) MLA with the local spec: MLASelfAttention builds its core attention with
    #     k_channels=/v_channels=, which only TEDotProductAttention accepts:
    #     "TypeError: DotProductAttention.__init__() got an unexpected keyword argument
    #     'k_channels' when instantiating MLASelfAttention". The local math already handles
    #     head_dim(q, k) != head_dim(v); only the softmax scale default and the output width
    #     (v_channels * heads per partition) must follow the given channels.
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    original = DotProductAttention.__init__

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, k_channels=None,
                 v_channels=None):
        if softmax_scale is None and k_channels is not None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        original(self, config, layer_number, attn_mask_type, attention_type, attention_dropout,
                 softmax_scale, cp_comm_type, pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__


def _patch_dot_product_attention_thd() -> None:
    # (12) Packed sequences in THD layout (PackedSeqParams, qkv_format "thd") reach the local
    #      DotProductAttention as [t, heads, dim] with cu_seqlens: "AssertionError: Packed sequence
    #      is not supported by DotProductAttention. Please use TEDotProductAttention instead."
    #      Fix: the same attention as one batch row of t tokens under the block-diagonal causal
    #      mask of cu_seqlens (r1mega.models.packing.thd_causal_mask): what TE's THD kernels
    #      compute, with O(t^2) memory (a CPU and test path, not a fast one).
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from r1mega.models.packing import thd_causal_mask

    original = DotProductAttention.forward

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias,
                            packed_seq_params)
        total = query.shape[0]
        mask = thd_causal_mask(packed_seq_params.cu_seqlens_q, total)
        out = original(self, query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type,
                       attention_bias, None)
        return out.squeeze(1)

    DotProductAttention.forward = forward


def _patch_mock_have_te() -> None:
    # (10) megatron-core 0.16.1 bug without TE: extensions/transformer_engine.py replaces `te` by a
    #      MagicMock when TE is missing, so `from ...extensions.transformer_engine import TELinear`
    #      succeeds in multi_latent_attention.py (and others) and sets their HAVE_TE = True with
    #      TELinear a MagicMock: "TypeError: isinstance() arg 2 must be a type, a tuple of types,
    #      or a union when instantiating MLASelfAttention" (multi_latent_attention.py:185).
    #      Fix: import the modules r1mega builds from, then set HAVE_TE = False in every loaded
    #      megatron module that claims it (megatron's own probe said TE is absent).
    import importlib

    for module_name in ("megatron.core.models.gpt.gpt_layer_specs",  # loads the layer modules
                        "megatron.core.transformer.multi_latent_attention",
                        "megatron.core.transformer.moe.experts", "megatron.core.transformer.moe.moe_layer"):
        importlib.import_module(module_name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.") and getattr(module, "HAVE_TE", None) is True:
            module.HAVE_TE = False


# ---------------------------------------------------------------------------------------------
# CPU group: no CUDA device, gloo
# ---------------------------------------------------------------------------------------------
def apply_cpu_shim() -> None:
    """Patches 1-11 for a CPU-only process; refuses when a CUDA device is present."""
    if "cpu" in _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_shim: a CUDA device is present; the CPU shim must not be applied")
    check_megatron_version()
    _set_cpu_environment()
    _patch_rng_tracker()                # 1
    _patch_current_device()             # 2
    _patch_streams_and_events()         # 3
    _enter_cuda_to_cpu_mode()           # 4 (and 11)
    _patch_move_to_cpu_numpy()          # 7
    _patch_gloo_uneven_collectives()    # 8
    apply_local_spec_workarounds()      # 5, 6, 9, 10
    _applied.add("cpu")


def _set_cpu_environment() -> None:
    # Not a megatron failure: throughput and start-up time. Respect an explicit choice.
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    if os.environ.setdefault("TORCH_COMPILE_DISABLE", "1") == "1":
        import torch._dynamo.config as dynamo_config

        dynamo_config.disable = True  # read at call time, so this also covers megatron's jit_fuser


def _patch_rng_tracker() -> None:
    # (1) megatron keeps per-TP/EP "CUDA" RNG states (tensor_parallel/random.py):
    #     "AssertionError: Torch not compiled with CUDA enabled" at random.py:235
    #     torch.cuda.get_rng_state(). Fix: back the tracker with the CPU generator. Never call
    #     torch.manual_seed here: it calls torch.cuda.manual_seed_all and recurses.
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _patch_current_device() -> None:
    # (2) torch.cuda.current_device() is passed as `device=` at ~175 megatron call sites:
    #     "AssertionError: Torch not compiled with CUDA enabled". Fix: answer "cpu".
    torch.cuda.current_device = lambda: "cpu"


class _NoEvent:
    def __init__(self, *args, **kwargs): pass
    def record(self, *args, **kwargs): pass
    def synchronize(self): pass
    def wait(self, *args, **kwargs): pass
    def query(self): return True
    def elapsed_time(self, other): return 0.0


class _NoStream:
    def __init__(self, *args, **kwargs): pass
    def __eq__(self, other): return isinstance(other, _NoStream)
    def __hash__(self): return 0
    def wait_stream(self, *args, **kwargs): pass
    def wait_event(self, *args, **kwargs): pass
    def record_event(self, event=None): return event or _NoEvent()
    def synchronize(self): pass
    def query(self): return True


def _patch_streams_and_events() -> None:
    # (3) The MoE alltoall dispatcher builds a side stream in __init__ (token_dispatcher.py:445),
    #     PP schedules and DDP use events: "RuntimeError: torch.cuda.Stream requires CUDA
    #     support". Fix: no-op streams/events. All fake streams compare equal, so megatron's
    #     "on a side stream" checks are false and no record_stream is issued.
    stream = _NoStream()
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.current_stream = lambda *args, **kwargs: stream
    torch.cuda.default_stream = lambda *args, **kwargs: stream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _to_cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


def _enter_cuda_to_cpu_mode() -> None:
    # (4) ~40 literal device="cuda" / .cuda() sites on the training path, the first in a plain
    #     forward: "AssertionError: Torch not compiled with CUDA enabled" at
    #     transformer/utils.py:35 torch.ones(sq, sq, device="cuda") (get_default_causal_mask).
    #     Fix: a process-wide TorchFunctionMode mapping cuda devices to the CPU (~2 ms a step).
    # (11) DistributedOptimizer/Float16Optimizer check `param.type() == 'torch.cuda.FloatTensor'`:
    #     "TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ... Received
    #     torch.FloatTensor" (optimizer/distrib_optimizer.py:420). Fix (inside the same mode):
    #     the no-argument Tensor.type() reports the torch.cuda.* name for CPU tensors.
    global _cuda_to_cpu_mode
    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
            if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device)):
                args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
            return func(*args, **kwargs)

    _cuda_to_cpu_mode = CudaToCpuMode()
    _cuda_to_cpu_mode.__enter__()  # stays active for the life of the process


def _patch_move_to_cpu_numpy() -> None:
    # (7) EP alltoall: moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True) converts only CUDA
    #     tensors, so on CPU the split sizes stay tensors and all_to_all_single rejects them:
    #     "TypeError: all_to_all_single(): incompatible function arguments". Fix: honour as_numpy
    #     for CPU tensors too (what the GPU path returns).
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_gloo_uneven_collectives() -> None:
    # (8) gloo cannot all_gather / reduce_scatter tensors of unequal sizes (NCCL can); TP x EP
    #     gathers a variable number of routed tokens over the expert-TP group:
    #     "RuntimeError: ProcessGroupGloo::allgather: invalid tensor size at index 1"
    #     (tensor_parallel/mappings.py:150). Fix: pad-to-max all_gather; reduce_scatter as
    #     all_reduce + local slice. Equal-size calls take the original path.
    import torch.distributed as dist

    original_all_gather = dist.all_gather
    original_reduce_scatter = dist.reduce_scatter

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}) == 1:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max([t.shape[0] for t in tensor_list] + [tensor.shape[0]])
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]].copy_(tensor)
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(buffers, padded, group=group)
        for out, buffer in zip(tensor_list, buffers):
            out.copy_(buffer[: out.shape[0]])
        return None

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if len({tuple(t.shape) for t in input_list}) == 1:
            with contextlib.suppress(RuntimeError):
                return original_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        flat = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(flat, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(flat[start: start + input_list[rank].numel()].view_as(output))
        return None

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter
