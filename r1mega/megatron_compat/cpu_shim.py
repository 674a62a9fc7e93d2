"""Workarounds that let megatron-core 0.16.1 run on a machine without a CUDA device (gloo).

:func:`apply_cpu_shim` applies, once per process, the CPU-only patches below plus the local-spec
group (:func:`r1mega.megatron_compat.local_spec.apply_local_spec_workarounds`: no Transformer Engine
on CPU either); it refuses when a CUDA device is present. Each patch has a comment naming the
failure it fixes (measured on megatron-core 0.16.1, torch 2.13 CPU build, gloo):

* 1: ``megatron.core.tensor_parallel.random``'s CUDA RNG tracker, backed by the CPU generator;
* 2: ``torch.cuda.current_device`` (passed as ``device=`` all over megatron) answers "cpu";
* 3: ``torch.cuda.Stream``/``Event`` (MoE alltoall dispatcher, PP schedules, DDP) become no-ops;
* 4 and 11: a process-wide ``TorchFunctionMode`` maps literal cuda devices to the CPU and makes
  ``Tensor.type()`` report ``torch.cuda.*`` names (``megatron.core.optimizer`` checks them);
* 7: ``megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu`` honours ``as_numpy`` for
  CPU tensors (EP alltoall split sizes);
* 8: ``torch.distributed.all_gather``/``reduce_scatter`` accept unequal sizes under gloo (TP x EP).

It also sets ``OMP_NUM_THREADS=1`` and ``TORCH_COMPILE_DISABLE=1`` unless the environment already
chose (megatron's router jit costs ~2 s per process on CPU, and two OpenMP threads on shared cores
made steps swing 11-705 ms). Guarded by :func:`r1mega.megatron_compat.version.check_megatron_version`.
"""

from __future__ import annotations

import contextlib
import os

import torch

from r1mega.megatron_compat.applied import is_applied, mark_applied
from r1mega.megatron_compat.local_spec import apply_local_spec_workarounds
from r1mega.megatron_compat.version import check_megatron_version

_cuda_to_cpu_mode = None  # the process-wide TorchFunctionMode of patch 4, once entered


def apply_cpu_shim() -> None:
    """Patches 1-12 for a CPU-only process; refuses when a CUDA device is present."""
    if is_applied("cpu"):
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
    apply_local_spec_workarounds()      # 5, 6, 9, 10, 12
    mark_applied("cpu")


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
