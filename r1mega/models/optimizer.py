"""The optimizer of a trainable policy and its state: megatron DDP, distributed Adam, the LR schedule.

:class:`TrainingState` wraps one GPTModel in megatron's DistributedDataParallel (fp32 gradient
reduction) and builds the distributed optimizer (Adam, decoupled weight decay, no decay on biases
and norms, gradient clipping by global norm) and an ``OptimizerParamScheduler`` (linear warm-up,
then constant, or a cosine or linear decay to optim.min_lr). Gradients are finalised without token scaling (:func:`finalize_without_token_scaling`):
the GRPO and SFT losses already carry their global denominators, so DDP sums and nothing rescales.

Its state (Adam moments, fp32 main weights of low-precision parameters, gradient buffers) can
leave the device while a colocated rollout engine runs (:meth:`TrainingState.offload`) and come
back before the next step (:meth:`TrainingState.onload`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from r1mega.config import OptimConfig


def finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """megatron's ``finalize_model_grads`` with no token count: reduce gradients (a sum over
    data-parallel ranks, sequence-parallel norms, tied embeddings, the expert-bias update), never
    rescale: the loss already carries the global denominators."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


class TrainingState:
    """DDP + the distributed Adam + the LR scheduler of `model` (a GPTModel of `dtype` parameters).
    `total_steps`: the run's optimizer steps, the decay's length unless optim.decay_steps is set.

    Building it sets the model config's gradient hooks (finalize, loss scaling, no-sync) that
    megatron's schedule calls. ``ddp`` is the model chunk the schedule must run.
    """

    def __init__(self, model, optim: OptimConfig, dtype: torch.dtype, total_steps: Optional[int] = None):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        config = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=True, check_for_nan_in_grad=False, average_in_collective=False)
        self.ddp = DistributedDataParallel(config, ddp_config, model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.grad_clip or 0.0, use_distributed_optimizer=True,
            bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        warmup = optim.warmup_steps
        decay_steps, min_lr = warmup + 1, 0.0
        if optim.lr_decay != "constant":
            decay_steps, min_lr = optim.decay_steps or total_steps, optim.min_lr
            if decay_steps is None or decay_steps <= warmup:
                raise ValueError(f"optim.lr_decay {optim.lr_decay}: the decay needs its length beyond the "
                                 f"{warmup} warm-up steps (optim.decay_steps, or the run's optimizer steps; got "
                                 f"{decay_steps})")
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=decay_steps, lr_decay_style=optim.lr_decay,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant",
            # a resumed run keeps its step count and takes its schedule from its own config (more
            # epochs lengthen the decay) instead of asserting that the checkpoint's is the same
            override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
        config.finalize_model_grads_func = finalize_without_token_scaling
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.ddp.no_sync
        self.device = next(model.parameters()).device
        self._offloaded: Optional[list] = None  # (tensor, bytes, host copy) while offloaded

    # ---- one step --------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        """Clear the gradient buffers before a step's backward passes."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        """Apply the accumulated gradients: (whether the update was applied, the gradient norm before
        clipping, NaN when megatron reports none). The scheduler advances only on an applied update."""
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return bool(ok), float(grad_norm) if grad_norm is not None else math.nan

    # ---- colocation ------------------------------------------------------------------------
    @property
    def offloaded(self) -> bool:
        """Whether the state is in host memory (a step would fail)."""
        return self._offloaded is not None

    def _state_tensors(self) -> list[tuple[torch.Tensor, bool]]:
        """(tensor, keep its values) of the optimizer states, the fp32 main copies of low-precision
        parameters and the gradient buffers (never the model's parameters)."""
        out, seen = [], set()

        def add(t, keep):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                out.append((t, keep))

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in opt.optimizer.state.values():
                for value in state.values():
                    add(value, True)
            for group in getattr(opt, "shard_fp32_from_float16_groups", None) or []:
                for t in group:
                    add(t, True)
        for buffer in self.ddp.buffers + self.ddp.expert_parallel_buffers:
            add(buffer.grad_data, False)  # zeroed before every step: nothing to keep
        return out

    def offload(self) -> int:
        """Release the device memory of the optimizer states and gradient buffers; the optimizer
        states go to host memory. Returns the bytes released. RuntimeError when already offloaded."""
        if self._offloaded is not None:
            raise RuntimeError("offload_training_state: already offloaded; call onload_training_state() first")
        pin = self.device.type == "cuda"
        self._offloaded, freed = [], 0
        for tensor, keep in self._state_tensors():
            storage = tensor.untyped_storage()
            host = tensor.detach().to("cpu", copy=True).pin_memory() if keep and pin else \
                (tensor.detach().to("cpu", copy=True) if keep else None)
            self._offloaded.append((tensor, storage.nbytes(), host))
            freed += storage.nbytes()
            storage.resize_(0)
        return freed

    def onload(self) -> None:
        """Undo :meth:`offload` (a no-op when nothing is offloaded)."""
        if not self._offloaded:
            self._offloaded = None
            return
        for tensor, nbytes, host in self._offloaded:
            tensor.untyped_storage().resize_(nbytes)
            if host is None:
                tensor.zero_()
            else:
                tensor.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._offloaded = None
