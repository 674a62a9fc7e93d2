"""One parallel layout for a run, and the process groups that realise it (megatron parallel_state).

:class:`ParallelConfig` names the sizes (TP, PP, EP, expert-TP) and the knobs that follow from them
(sequence parallelism, the MoE token dispatcher, uneven pipeline stages); the data-parallel size
is derived from the world size. :func:`init_parallel` checks the world size against the config
*before any work*, applies the megatron workarounds this machine needs
(:mod:`r1mega.megatron_compat`), initialises ``torch.distributed`` when the caller has not, and
calls ``megatron.core.parallel_state.initialize_model_parallel``. It returns a :class:`Layout`:
this rank's coordinates in every group.

Megatron's rank order is ``tp-cp-ep-dp-pp`` (its default): TP ranks are adjacent, then EP, then DP,
and pipeline stages are the outermost blocks. Context parallelism is not offered yet (cp = 1).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

from r1mega.config import ParallelConfig
from r1mega.megatron_compat import prepare_megatron


@dataclass(frozen=True)
class Layout:
    """This rank's place in every group of an initialised :class:`ParallelConfig`."""

    world: int
    rank: int
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    ep: int
    ep_rank: int
    etp: int
    etp_rank: int
    dp: int
    dp_rank: int
    expert_dp: int
    expert_dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} "
                f"ep {self.ep_rank}/{self.ep} etp {self.etp_rank}/{self.etp} dp {self.dp_rank}/{self.dp}")


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise ``torch.distributed`` unless already done; return (rank, world size).

    Under torchrun the environment gives rank and world size; a plain single process gets a
    one-rank group over an in-memory store. The backend is nccl with CUDA, gloo without.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def init_parallel(config: ParallelConfig, *, seed: int = 0, backend: Optional[str] = None) -> Layout:
    """Set up megatron's process groups for `config` on every rank; return this rank's Layout.

    The world size is checked first (a ConfigError names the mismatch) so a wrong launch fails
    before any model is built. Re-initialising with another config tears the old groups down.
    """
    import torch.distributed as dist

    world_env = os.environ.get("WORLD_SIZE")
    if dist.is_initialized():
        config.check_world(dist.get_world_size())  # before any work
    else:  # before touching any process group: torchrun's world, or the single process we will start
        config.check_world(int(world_env) if world_env and world_env.isdigit() else 1)

    prepare_megatron()
    _, world = init_distributed(backend)
    config.check_world(world)

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=config.tp,
        pipeline_model_parallel_size=config.pp,
        expert_model_parallel_size=config.ep,
        expert_tensor_parallel_size=config.expert_tp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    """The Layout of the process groups megatron holds now."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron's process groups are not initialised; call init_parallel first")
    return Layout(
        world=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
        expert_dp=ps.get_expert_data_parallel_world_size(), expert_dp_rank=ps.get_expert_data_parallel_rank(),
    )


def destroy_parallel(*, process_group: bool = False) -> None:
    """Tear down megatron's groups (and the default process group when `process_group`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()
