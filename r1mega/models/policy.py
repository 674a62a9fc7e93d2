"""The trainer's view of a megatron model: log-probs, a GRPO training step, checkpoints, weight export.

    policy = load_policy(path, tp=2, ep=2, pp=1)         # every rank of a torchrun job
    logp = policy.logprobs(input_ids, attention_mask)     # [S, T] on every rank
    metrics = policy.train_step(batch)                    # one optimizer step on the GRPO loss
    policy.save_checkpoint(run_dir, data_state=sampler.state_dict())
    for bucket in policy.hf_weight_buckets(512 << 20):    # full HF-named tensors, every rank
        engine.load_weights(bucket)
    policy.export_hf(out_dir)                             # safetensors directory

``path`` is a Hugging Face directory (config.json + safetensors), a directory written by
``r1mega convert --to-megatron``, or an r1mega training checkpoint (a root with ``latest``, or
one ``step_N/``): the latter also restores the optimizer, scheduler, RNG and the caller's data
position (``policy.data_state``), in any layout (see :mod:`r1mega.models.checkpoint`).

Token alignment (log-probs, masks and loss inputs are all [S, T], aligned with ``input_ids``)::

    logp[s, t] = log p(input_ids[s, t] | input_ids[s, :t])   for t >= 1 where attention_mask[s, t] = 1
    logp[s, t] = 0                                            for t = 0 and at padding

computed from the logits at position t - 1, divided by ``temperature`` (the sampling temperature
of the rollouts). Rows must be right-padded: ``attention_mask[s]`` is ones then zeros (a prompt
that was left-padded for generation is packed to the left with its completion). The
completion mask marks the tokens the loss counts; it must be 0 at t = 0 and at padding.

Parallelism, per step (micro-batches of at most ``micro_batch_tokens`` real tokens, packed and
balanced over data parallelism by r1mega.batching, or of ``micro_batch_size`` rows; each cut to
its own longest row, or all padded to one shape when pp > 1):

* Data parallel: by default (``split_dp=True``) every rank passes the WHOLE mini-batch and each
  data-parallel rank takes its share of the rows (a contiguous block in rows mode; a balanced
  set with token budgets). With ``split_dp=False`` each data-parallel rank passes its own rows.
  Sequences are padded to a multiple of tp under sequence parallelism.
* The loss of every micro-batch comes from the last stage's final hidden states and the output
  layer's vocabulary shard through :func:`r1mega.ops.linear_grpo_loss` (fused linear + GRPO
  loss, completion tokens only, never [N, V] logits; log-probs combined over TP with
  all-reduces of per-token partials), with GLOBAL
  denominators: :func:`r1mega.algo.local_denominators` of every local micro-batch, all-reduced
  over the data-parallel group. The mini-batch loss is then the SUM of the micro-batch losses
  over micro-batches and ranks, so megatron is set up to sum, not average: the model config
  has ``calculate_per_token_loss=True`` (the schedule does not divide by the number of
  micro-batches; DDP sums gradients over data-parallel ranks) and ``finalize_model_grads`` is
  called without a token count (no rescaling). Gradient accumulation and data parallelism are
  therefore exact, and every layout gives the same step.
* Pipeline parallel: megatron's forward-backward schedule (1F1B, or forward-only for
  log-probs); the last stage computes log-probs / the loss, and its results ([S, T] log-probs,
  metrics) are all-gathered over data parallel and broadcast over the pipeline group, so every
  rank returns the same values.
* Optimizer: megatron DDP (fp32 gradient reduction) + the distributed optimizer (Adam, decoupled
  weight decay, no decay on biases and norms, gradient clipping by global norm), an
  ``OptimizerParamScheduler`` (linear warm-up, then constant) and ``finalize_model_grads``
  (DP reduce-scatter, sequence-parallel norm gradients, tied embeddings across stages, the
  DeepSeek-V3 expert-bias update). Padding tokens are excluded from the expert-bias counts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.config import ConfigError, OptimConfig, ParallelConfig
from r1mega.models.hf_config import ModelDesc
from r1mega.models.packing import PackedRope, block_causal_mask, check_segments, segment_positions

LOSS_OPTIONS = ("eps_low", "eps_high", "dual_clip", "ratio_level", "kl_coef", "kl_estimator", "kl_clamp", "tis_cap",
                "agg", "norm_length")
REQUIRED_TENSORS = ("input_ids", "attention_mask", "completion_mask", "old_logp", "advantages")
OPTIONAL_TENSORS = ("ref_logp", "rollout_logp")
MEAN_METRICS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    kind: str  # hf | converted | checkpoint
    path: Path  # the HF dir, the converted dir, or the checkpoint's step directory
    config_dir: Path  # holds config.json (and the other non-weight files)
    weights: Optional[Path]  # dist_checkpointing directory (converted, checkpoint)
    hf_dtypes: Optional[dict]


def _resolve_source(path: str | Path) -> _Source:
    from r1mega.models import checkpoint as ckpt
    from r1mega.models.convert import HF_FILES, MEGATRON_META, MEGATRON_WEIGHTS
    from r1mega.models.errors import CheckpointError

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / MEGATRON_META).is_file():
        import json

        meta = json.loads((path / MEGATRON_META).read_text())
        return _Source("converted", path, path / HF_FILES, path / MEGATRON_WEIGHTS, meta.get("dtypes"))
    if (path / "config.json").is_file() and not ckpt.is_checkpoint_dir(path):
        return _Source("hf", path, path, None, None)
    step_dir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(step_dir)
    return _Source("checkpoint", step_dir, step_dir / ckpt.HF_DIR, step_dir / ckpt.WEIGHTS_DIR, meta.get("hf_dtypes"))


def _ensure_parallel(parallel: ParallelConfig, seed: int):
    from megatron.core import parallel_state as ps

    from r1mega.parallel.state import current_layout, init_parallel

    if ps.model_parallel_is_initialized():
        now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
               ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if now == (parallel.tp, parallel.pp, parallel.ep, parallel.expert_tp):
            return current_layout()
    return init_parallel(parallel, seed=seed)


def load_policy(path: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None,
                parallel: Optional[ParallelConfig] = None, dtype: torch.dtype = torch.float32,
                optim: Optional[OptimConfig] = None, trainable: bool = True, micro_batch_size: int = 1,
                temperature: float = 1.0, seed: int = 0, backend: Optional[str] = None,
                load_optimizer: bool = True, router_replay: bool = False, **config_overrides) -> Policy:
    """A :class:`Policy` for `path` in the layout tp/ep/pp (or `parallel`); call on every rank.

    Initialises ``torch.distributed`` (torchrun's environment, or a one-process group) and
    megatron's groups unless they already hold this layout (re-initialising for another layout
    invalidates policies built in the old one). `dtype` is the parameter dtype (float32 or
    bfloat16; Adam keeps fp32 main weights). `trainable=False` builds no optimizer (a reference
    or rollout-side model). `optim` (default :class:`~r1mega.config.OptimConfig`) sets Adam,
    weight decay, gradient clipping and warm-up. `load_optimizer=False` restores a checkpoint's
    weights and step count only (fresh Adam moments, scheduler and RNG). `config_overrides` go to
    megatron's TransformerConfig. `router_replay=True` (MoE models) lets log-probs and training
    steps take the rollout engine's recorded expert choices (``routes``; see
    :mod:`r1mega.models.router_replay`).
    Problems with `path` (not a model, a bad tensor) raise before any process group is set up.
    """
    from r1mega.models import checkpoint as ckpt
    from r1mega.models.build import build_model
    from r1mega.models.hf_config import describe_hf_model
    from r1mega.models.hf_checkpoint import check_hf_checkpoint, load_hf_weights

    if parallel is None:
        parallel = ParallelConfig(tp=tp, ep=ep, pp=pp, etp=etp)
    elif (tp, ep, pp, etp) != (1, 1, 1, None):
        raise ConfigError("load_policy: pass either parallel= or tp/ep/pp/etp, not both")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"load_policy: dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}")
    source = _resolve_source(path)
    desc = describe_hf_model(source.config_dir)
    hf_dtypes = source.hf_dtypes
    if source.kind == "hf":
        check_hf_checkpoint(source.path, desc)
    _ensure_parallel(parallel, seed)
    model = build_model(desc, parallel, dtype=_DTYPE_NAMES[dtype], calculate_per_token_loss=True,
                        **config_overrides)
    if source.kind == "hf":
        hf_dtypes = load_hf_weights(model, desc, source.path).dtypes
    else:
        ckpt.load_model_weights(model, source.weights)
    policy = Policy(model, desc, parallel, dtype=dtype, hf_dtypes=hf_dtypes, side_files=source.config_dir,
                    optim=optim, trainable=trainable, micro_batch_size=micro_batch_size,
                    temperature=temperature, backend=backend, seed=seed)
    if router_replay:
        policy.enable_router_replay()
    if source.kind == "checkpoint":
        report = ckpt.load_checkpoint(policy, source.path, load_optimizer=load_optimizer, load_model=False)
        policy.data_state = report.data_state
        policy.load_report = report
    return policy


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------
def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    # The loss already carries the global denominators: reduce gradients (sum), never rescale.
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


def _fix_expert_bias_padding(model) -> None:
    # megatron-core 0.16.1 bug (any device): TopKRouter._apply_expert_bias masks the [N, E]
    # routing map with the flattened [N] padding mask, `routing_map & (~padding_mask)`, which
    # fails unless N == E: "RuntimeError: The size of tensor a (8) must match the size of tensor b
    # (24) at non-singleton dimension 1" (router.py:542). Fix, on this model's routers only: the
    # same update with the mask broadcast over experts. Written for 0.16.1 (the shim's version).
    from megatron.core.transformer.moe.router import TopKRouter

    from r1mega.parallel.cpu_shim import MEGATRON_VERSION, installed_megatron_version

    if installed_megatron_version() != MEGATRON_VERSION:
        return
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.enable_expert_bias:
            def apply_expert_bias(routing_map, padding_mask=None, router=module):
                if router.enable_expert_bias and torch.is_grad_enabled():
                    with torch.no_grad():
                        if padding_mask is not None:
                            routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                        router.local_tokens_per_expert += routing_map.sum(dim=0)

            module._apply_expert_bias = apply_expert_bias


def _pad(x: torch.Tensor, rows: int, cols: Optional[int], value=0) -> torch.Tensor:
    pad_rows = rows - x.shape[0]
    pad_cols = 0 if cols is None or x.dim() < 2 else cols - x.shape[1]
    if pad_rows == 0 and pad_cols == 0:
        return x
    shape = (rows,) + ((x.shape[1] + pad_cols,) if x.dim() >= 2 else ()) + tuple(x.shape[2:])
    out = x.new_full(shape, value)
    if x.dim() >= 2:
        out[: x.shape[0], : x.shape[1]] = x
    else:
        out[: x.shape[0]] = x
    return out


class _HiddenStatesOut:
    """While active, the last stage's output layer returns its input, so the model's output is
    the final hidden states [b, s, h] (sequence-gathered under sequence parallelism, whose
    backward reduce-scatters the partial gradients) and the loss takes them with ``weight``
    (the output layer's vocabulary shard, or the tied embedding) through the fused linear op."""

    def __init__(self, model, is_last_stage: bool, tp_group):
        from r1mega.models.build import unwrap_model

        self.layer = unwrap_model(model).output_layer if is_last_stage else None
        self.sequence_parallel = bool(getattr(self.layer, "sequence_parallel", False))
        self.tp_group, self.weight = tp_group, None

    def _forward(self, hidden_states, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        self.weight = self.layer.weight if weight is None else weight
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                                 group=self.tp_group)
        return hidden_states, None

    def __enter__(self):
        if self.layer is not None:
            self.layer.forward = self._forward  # the instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc):
        if self.layer is not None:
            del self.layer.forward
        return False


class Policy:
    """One rank's part of a megatron GPT model, with its optimizer; built by :func:`load_policy`.

    Every method is collective: call it on every rank with the same arguments (with
    ``split_dp=False``, the same within each data-parallel replica).

    Attributes: ``desc`` (ModelDesc), ``parallel`` (ParallelConfig), ``layout`` (this rank's
    Layout), ``model`` (the GPTModel), ``optimizer`` / ``scheduler`` (None when not trainable),
    ``step`` (optimizer steps taken), ``data_state`` (what the loaded checkpoint's caller saved),
    ``hf_dtypes`` (safetensors dtype of every HF tensor, from the source).
    """

    def __init__(self, model, desc: ModelDesc, parallel: ParallelConfig, *, dtype: torch.dtype,
                 hf_dtypes: Optional[dict], side_files: Optional[Path], optim: Optional[OptimConfig],
                 trainable: bool, micro_batch_size: int, temperature: float, backend: Optional[str], seed: int):
        from r1mega.models.hf_mapping import export_dtypes
        from r1mega.parallel.state import current_layout

        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model, self.desc, self.parallel = model, desc, parallel
        self.layout = current_layout()
        self.dtype, self.dtype_name = dtype, _DTYPE_NAMES[dtype]
        self.hf_dtypes = {**export_dtypes(desc), **(hf_dtypes or {})}
        self.side_files = side_files
        self.micro_batch_size, self.temperature, self.seed = micro_batch_size, float(temperature), seed
        # The Triton kernels where they compile (CUDA); chunked torch on CPU (the interpreter is
        # for kernel tests, far too slow for a model).
        self.backend = backend if backend is not None else (None if torch.cuda.is_available() else "torch")
        # Inputs may come on any device; the model's is CUDA where there is one, else the CPU.
        self.device = next(model.parameters()).device
        self.step = 0
        self.data_state: Optional[dict] = None
        self.load_report = None
        self.optim = optim or OptimConfig()
        self.ddp = self.optimizer = self.scheduler = None
        self._streams: dict = {}
        self._offloaded: Optional[list] = None  # (tensor, bytes, host copy) while offloaded
        self.router_replay = None  # r1mega.models.router_replay.RouterReplay once enabled
        _fix_expert_bias_padding(model)
        if trainable:
            self._setup_training()

    # ---- setup -----------------------------------------------------------------------------
    def _setup_training(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        optim, config = self.optim, self.model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=True, check_for_nan_in_grad=False, average_in_collective=False)
        self.ddp = DistributedDataParallel(config, ddp_config, self.model)
        opt_config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=0.0, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.grad_clip or 0.0, use_distributed_optimizer=True,
            bf16=self.dtype == torch.bfloat16, fp16=False, params_dtype=self.dtype)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])
        warmup = optim.warmup_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=0.0,
            lr_warmup_steps=warmup, lr_decay_steps=warmup + 1, lr_decay_style="constant",
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        config.finalize_model_grads_func = _finalize_without_token_scaling
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.ddp.no_sync

    @property
    def _chunk(self):
        return self.ddp if self.ddp is not None else self.model

    # ---- batches ---------------------------------------------------------------------------
    def _check_ids(self, input_ids, attention_mask):
        from r1mega.algo.checks import check_integer, check_shape

        check_integer("input_ids", input_ids)
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [S, T] with T >= 2, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        check_shape("attention_mask", attention_mask, input_ids.shape, like="input_ids")
        am = attention_mask != 0
        bad = (am[:, 1:] & ~am[:, :-1]).any(dim=1).nonzero()
        if bad.numel():
            raise ValueError(f"attention_mask: rows must be right-padded (ones, then zeros); row {bad[0].item()} "
                             "has a 1 after a 0")
        if ((input_ids < 0) | (input_ids >= self.desc.vocab_size))[am].any():
            raise ValueError(f"input_ids: token ids must be in [0, {self.desc.vocab_size}) where attention_mask is 1")
        return input_ids, am

    def _plan(self, lengths: Sequence[int], split_dp: bool, *, mbs: Optional[int],
              budget: Optional[int], balance: str = "karmarkar-karp") -> list[list[int]]:
        """This rank's micro-batches, each a list of row indices into the rows the caller passed.

        Every data-parallel rank gets the same number of micro-batches (lockstep schedules); some
        may be empty. ``budget`` (tokens): each rank's share is split into micro-batches of at
        most ``budget`` real tokens by r1mega.batching.pack_microbatches; with ``balance``
        "karmarkar-karp" the shares are balanced by token count, with "none" they are contiguous
        row blocks. Otherwise ``mbs`` rows each, from contiguous row blocks.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from r1mega.batching import pack_microbatches

        dp, dp_rank, n_rows = self.layout.dp, self.layout.dp_rank, len(lengths)
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"micro_batch_tokens must be a positive int, got {budget!r}")
            if n_rows and max(lengths) > budget:
                row = max(range(n_rows), key=lambda i: lengths[i])
                raise ValueError(f"micro_batch_tokens {budget} < row {row}'s {lengths[row]} tokens: raise "
                                 "batch.micro_batch_tokens to at least the longest prompt + completion")
            if balance not in ("karmarkar-karp", "none"):
                raise ValueError(f"balance must be 'karmarkar-karp' or 'none', got {balance!r}")
            if split_dp and balance == "karmarkar-karp":
                return pack_microbatches(list(lengths), budget, dp)[dp_rank]
            rows = list(range(n_rows))
            if split_dp:  # balance "none": this rank's contiguous block, packed alone
                per = -(-n_rows // dp)
                rows = rows[min(dp_rank * per, n_rows):min((dp_rank + 1) * per, n_rows)]
            packed = pack_microbatches([lengths[i] for i in rows], budget, 1)[0] if rows else []
            plan = [[rows[j] for j in mb] for mb in packed]
            count = len(plan)
        else:
            if split_dp:
                per = -(-n_rows // dp)
                start = min(dp_rank * per, n_rows)
                rows = list(range(start, min(start + per, n_rows)))
                return [rows[i * mbs:(i + 1) * mbs] for i in range(max(1, -(-per // mbs)))]
            plan = [list(range(i, min(i + mbs, n_rows))) for i in range(0, n_rows, mbs)]
            count = len(plan)
        most = torch.tensor([count], device=self.device)
        if dp > 1:
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return plan + [[] for _ in range(max(1, int(most)) - count)]

    def _padded_len(self, seq: int) -> int:
        tp = self.layout.tp
        return -(-seq // tp) * tp if self.model.config.sequence_parallel else seq

    def _micro_batches(self, tensors: dict[str, torch.Tensor], plan: list[list[int]],
                       lengths: Sequence[int]) -> list[dict]:
        """Each micro-batch's rows, cut to its own longest row (right padding beyond it changes
        nothing: attention is causal); an empty micro-batch is one fully masked row."""
        out = []
        # Pipeline stages exchange activations of one fixed shape: there, every micro-batch is
        # padded to the largest one's rows and length.
        fixed = self.layout.pp > 1
        most_rows = max([1] + [len(rows) for rows in plan])
        longest = max([2] + [int(lengths[i]) for rows in plan for i in rows])
        for rows in plan:
            seq = self._padded_len(longest if fixed else max([2] + [int(lengths[i]) for i in rows]))
            n = most_rows if fixed else max(1, len(rows))
            idx = torch.as_tensor(rows, dtype=torch.long)
            mb = {}
            for name, t in tensors.items():
                part = t[idx.to(t.device)]
                if part.dim() >= 2:
                    part = part[:, :seq]
                mb[name] = _pad(part.to(self.device), n, seq if part.dim() >= 2 else None)
            mb["rows"] = rows
            mb["position_ids"] = torch.arange(seq, device=self.device).unsqueeze(0).expand(mb["input_ids"].shape[0], seq)
            mb["padding_mask"] = self._stage_padding_mask(~mb["attention_mask"])
            out.append(mb)
        return out

    def _stage_padding_mask(self, padding_mask: torch.Tensor) -> torch.Tensor:
        # GPTModel scatters the [B, T] padding mask over the sequence-parallel ranks on the first
        # stage only; later stages get it as given, so they must get this rank's slice.
        if self.layout.is_first_stage or not self.model.config.sequence_parallel:
            return padding_mask
        seq, tp, r = padding_mask.shape[1], self.layout.tp, self.layout.tp_rank
        return padding_mask[:, r * seq // tp: (r + 1) * seq // tp].contiguous()

    def _run(self, forward_step, micro_batches: list[dict], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # The shape megatron's pipeline schedule communicates (all micro-batches share it when pp > 1).
        rows, seq = micro_batches[0]["input_ids"].shape
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self._chunk],
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=rows, forward_only=forward_only)

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast a tensor (of a shape every rank knows) from the last pipeline stage."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.layout.pp > 1:
            dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return tensor

    # ---- router replay ---------------------------------------------------------------------
    def enable_router_replay(self) -> None:
        """Let log-probs and training steps replay recorded expert choices (MoE models)."""
        from r1mega.models.build import unwrap_model
        from r1mega.models.router_replay import RouterReplay

        if not self.desc.is_moe:
            raise ValueError(f"router replay needs an MoE model; {self.desc.arch} has no experts")
        if self.router_replay is None:
            moe_layers = tuple(i for i in range(self.desc.num_layers) if self.desc.is_moe_layer(i))
            self.router_replay = RouterReplay(unwrap_model(self.model), moe_layers, self.desc.moe.topk)

    def _check_routes(self, routes: torch.Tensor, shape) -> torch.Tensor:
        from r1mega.models.router_replay import check_routes

        if self.router_replay is None:
            raise ValueError("routes given, but the policy was loaded without router_replay=True")
        replay = self.router_replay
        check_routes(routes, tuple(shape), len(replay.moe_layers), replay.top_k, self.desc.moe.num_experts)
        return routes

    def _replay(self, mb: dict) -> None:
        if self.router_replay is not None:
            self.router_replay.set(mb.get("routes"), mb["attention_mask"], tp=self.layout.tp,
                                   tp_rank=self.layout.tp_rank, sequence_parallel=self.model.config.sequence_parallel)

    # ---- packed rows -----------------------------------------------------------------------
    def _check_segments(self, segment_ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        from r1mega.algo.checks import check_integer
        from r1mega.parallel.cpu_shim import megatron_has_te

        check_integer("segment_ids", segment_ids)
        check_segments(segment_ids, am)
        if megatron_has_te():
            # TE's fused attention ignores an explicit mask under the causal mask type.
            raise NotImplementedError("packed rows (segment_ids) need the local attention spec; with Transformer "
                                      "Engine they need PackedSeqParams (THD), not implemented yet")
        return segment_ids.long()

    def _forward(self, model, mb: dict, rope):
        """The model on one micro-batch; packed rows get their block mask and per-example positions."""
        if "segment_ids" not in mb:
            return model(mb["input_ids"], mb["position_ids"], None, padding_mask=mb["padding_mask"])
        segments = mb["segment_ids"]
        positions = segment_positions(segments)
        rope.set(positions)
        return model(mb["input_ids"], positions, block_causal_mask(segments), padding_mask=mb["padding_mask"])

    # ---- log-probs -------------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 micro_batch_size: Optional[int] = None, micro_batch_tokens: Optional[int] = None,
                 split_dp: bool = True, routes: Optional[torch.Tensor] = None,
                 balance: str = "karmarkar-karp", segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[S, T] float32 log-probs of `input_ids` (see the module docstring for the alignment).

        Same arguments on every rank; the same result on every rank. The rows are split over the
        data-parallel ranks (``split_dp=False``: each data-parallel replica passes and gets its
        own rows). Micro-batches: at most ``micro_batch_tokens`` real tokens each (the ranks'
        shares balanced by token count with ``balance="karmarkar-karp"``, contiguous row blocks
        with "none"), else ``micro_batch_size`` rows (default: the policy's). `routes` ([S, T, moe_layers, top_k] expert ids, e.g. the rollout engine's)
        replays those expert choices (needs ``router_replay=True`` at load). `segment_ids`
        ([S, T], see r1mega.models.packing): packed rows, each example attending only to itself
        with positions from 0.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from r1mega.ops.vocab_parallel import vocab_parallel_token_logprobs

        input_ids, am = self._check_ids(input_ids, attention_mask)
        n_rows, seq = input_ids.shape
        lengths = am.sum(1).tolist()
        plan = self._plan(lengths, split_dp, mbs=micro_batch_size or self.micro_batch_size, budget=micro_batch_tokens,
                          balance=balance)
        tensors = {"input_ids": input_ids, "attention_mask": am}
        if routes is not None:
            tensors["routes"] = self._check_routes(routes, input_ids.shape)
        if segment_ids is not None:
            tensors["segment_ids"] = self._check_segments(segment_ids, am)
        micro_batches = self._micro_batches(tensors, plan, lengths)
        tp_group = ps.get_tensor_model_parallel_group()

        def loss_func(mb, output):
            logp = vocab_parallel_token_logprobs(output[:, :-1], mb["input_ids"][:, 1:], group=tp_group,
                                                 temperature=self.temperature, backend=self.backend)
            logp = torch.nn.functional.pad(logp.float(), (1, 0))
            return output.new_zeros(()), torch.zeros((), dtype=torch.int, device=self.device), {"logp": logp}

        rope = PackedRope(self.model) if segment_ids is not None else contextlib.nullcontext()

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            self._replay(mb)
            return self._forward(model, mb, rope), lambda output: loss_func(mb, output)

        was_training = self.model.training
        self.model.eval()
        try:
            with rope:
                results = self._run(forward_step, micro_batches, forward_only=True)
        finally:
            self.model.train(was_training)
            if self.router_replay is not None:
                self.router_replay.clear()
        full = torch.zeros(n_rows, seq, device=self.device)
        if self.layout.is_last_stage:
            for mb, r in zip(micro_batches, results):
                if mb["rows"]:
                    width = min(seq, r["logp"].shape[1])
                    full[torch.as_tensor(mb["rows"], device=self.device), :width] = r["logp"][:len(mb["rows"]), :width]
            if split_dp and self.layout.dp > 1:  # each data-parallel rank filled its own rows
                dist.all_reduce(full, group=ps.get_data_parallel_group())
        full = self._from_last_stage(full.contiguous())
        full[:, 0] = 0.0
        return full.masked_fill(~am.to(full.device), 0.0).to(input_ids.device)

    # ---- training --------------------------------------------------------------------------
    def _parse_batch(self, batch: Mapping[str, Any]):
        from r1mega.algo.checks import check_shape
        from r1mega.algo.policy_loss import check_loss_options

        if self.optimizer is None:
            raise RuntimeError("train_step: this policy was loaded with trainable=False")
        if self._offloaded is not None:
            raise RuntimeError("train_step: the training state is offloaded; call onload_training_state() first")
        unknown = sorted(set(batch) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS) - {"routes"} - set(LOSS_OPTIONS))
        if unknown:
            raise ValueError(f"train_step: unknown batch key {unknown[0]!r}; tensors: "
                             f"{', '.join(REQUIRED_TENSORS + OPTIONAL_TENSORS + ('routes',))}; "
                             f"loss options: {', '.join(LOSS_OPTIONS)}")
        missing = [k for k in REQUIRED_TENSORS if batch.get(k) is None]
        if missing:
            raise ValueError(f"train_step: batch has no {missing[0]!r}")
        options = {k: batch[k] for k in LOSS_OPTIONS if k in batch}
        agg = options.get("agg", "token-mean")
        if agg == "seq-mean-token-sum-norm" and options.get("norm_length") is None:
            raise ValueError("train_step: agg='seq-mean-token-sum-norm' needs norm_length (the [S, T] rows hold "
                             "prompts too, so T is no completion length)")
        check_loss_options(**{**{k: None for k in ("dual_clip", "kl_clamp", "tis_cap", "norm_length")},
                              "eps_low": 0.2, "eps_high": 0.2, "ratio_level": "token", "kl_coef": 0.0,
                              "kl_estimator": "k3", "agg": "token-mean", **options},
                           has_ref=batch.get("ref_logp") is not None, has_rollout=batch.get("rollout_logp") is not None,
                           global_tokens=None, global_sequences=None)
        input_ids, am = self._check_ids(batch["input_ids"], batch["attention_mask"])
        shape = input_ids.shape
        tensors = {"input_ids": input_ids, "attention_mask": am}
        mask = batch["completion_mask"]
        check_shape("completion_mask", mask, shape, like="input_ids")
        mask = mask != 0
        if (mask & ~am).any():
            raise ValueError("completion_mask: marks a padding position (attention_mask is 0 there)")
        if mask[:, 0].any():
            raise ValueError("completion_mask: must be 0 at t = 0 (the first token has no log-prob)")
        tensors["completion_mask"] = mask
        for name in ("old_logp",) + OPTIONAL_TENSORS:
            if batch.get(name) is not None:
                check_shape(name, batch[name], shape, like="input_ids", floating=True)
                tensors[name] = batch[name].float()
        adv = batch["advantages"]
        if not (isinstance(adv, torch.Tensor) and adv.is_floating_point() and adv.shape in (shape[:1], shape)):
            raise ValueError(f"advantages must be a float tensor of shape [S] {tuple(shape[:1])} or [S, T] "
                             f"{tuple(shape)}, got {adv!r:.80}")
        tensors["advantages"] = adv.float()
        if batch.get("routes") is not None:
            tensors["routes"] = self._check_routes(batch["routes"], shape)
        return tensors, options, agg

    def train_step(self, batch: Mapping[str, Any], *, split_dp: bool = True, micro_batch_size: Optional[int] = None,
                   micro_batch_tokens: Optional[int] = None, balance: str = "karmarkar-karp",
                   loss_head: str = "fused") -> dict[str, float]:
        """One optimizer step on the GRPO loss of `batch`; returns metrics (the same on every rank).

        batch: ``input_ids``, ``attention_mask``, ``completion_mask``, ``old_logp`` (all [S, T],
        aligned as in the module docstring), ``advantages`` ([S] or [S, T]), optionally
        ``ref_logp`` and ``rollout_logp`` ([S, T]), and any r1mega.algo.policy_loss keyword
        (eps_low, eps_high, dual_clip, ratio_level, kl_coef, kl_estimator, kl_clamp, tis_cap, agg,
        norm_length). The denominators are global (never pass global_tokens/global_sequences).

        The loss comes from the last stage's final hidden states and the output-layer weight
        through r1mega.ops.linear_grpo_loss, on completion tokens only: no [rows, T, V] logits
        ever exist. ``loss_head="logits"`` takes the loss from the output layer's [rows, T, V/tp]
        logits through r1mega.ops.vocab_parallel_grpo_loss instead: the same loss and gradients, for
        comparison (benchmarks/bench_policy.py measures what the fused head saves). Micro-batches
        and ``balance`` as in :meth:`logprobs` (``micro_batch_tokens`` real tokens each, or
        ``micro_batch_size`` rows).

        Metrics: ``loss`` (the mini-batch loss), ``grad_norm`` (before clipping), ``lr`` (used by
        this step), ``tokens`` and ``sequences`` (the global denominators' counts), the policy
        loss metrics as token-weighted means over the mini-batch (``clip_frac_low``, ...,
        ``kl_mean`` with ref_logp, ``tis_weight_mean`` with rollout_logp), ``ratio_max``,
        ``update_successful`` and ``step`` (optimizer steps taken so far).
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from r1mega.algo.policy_loss import local_denominators
        from r1mega.ops.linear import linear_grpo_loss
        from r1mega.ops.vocab_parallel import vocab_parallel_grpo_loss

        if loss_head not in ("fused", "logits"):
            raise ValueError(f"train_step: loss_head must be 'fused' or 'logits', got {loss_head!r}")
        tensors, options, agg = self._parse_batch(batch)
        lengths = tensors["attention_mask"].sum(1).tolist()
        plan = self._plan(lengths, split_dp, mbs=micro_batch_size or self.micro_batch_size, budget=micro_batch_tokens,
                          balance=balance)
        micro_batches = self._micro_batches(tensors, plan, lengths)

        # Global denominators: counts of every micro-batch of every data-parallel rank.
        mine = torch.as_tensor(sorted(i for rows in plan for i in rows), dtype=torch.long)
        local_mask = tensors["completion_mask"][mine][:, 1:]
        counts = torch.stack([
            local_denominators(local_mask, "token-mean")["global_tokens"],
            local_denominators(local_mask, "seq-mean-token-mean")["global_sequences"]]
        ).double().to(self.device)
        if self.layout.dp > 1:
            dist.all_reduce(counts, group=ps.get_data_parallel_group())
        tokens, sequences = float(counts[0]), float(counts[1])
        denominators = ({"global_tokens": max(tokens, 1.0)} if agg == "token-mean"
                        else {"global_sequences": max(sequences, 1.0)})
        has_ref, has_rollout = "ref_logp" in tensors, "rollout_logp" in tensors
        metric_keys = MEAN_METRICS + (("kl_mean",) if has_ref else ()) + (("tis_weight_mean",) if has_rollout else ())
        tp_group = ps.get_tensor_model_parallel_group() if self.layout.tp > 1 else None
        head = _HiddenStatesOut(self.model, self.layout.is_last_stage, tp_group)

        def loss_func(mb, output):  # output: final hidden states (fused head) or logits
            adv = mb["advantages"] if mb["advantages"].dim() == 1 else mb["advantages"][:, 1:]
            inputs = (mb["input_ids"][:, 1:], mb["old_logp"][:, 1:], adv, mb["completion_mask"][:, 1:])
            common = dict(temperature=self.temperature, backend=self.backend, group=tp_group,
                          ref_logp=mb["ref_logp"][:, 1:] if has_ref else None,
                          rollout_logp=mb["rollout_logp"][:, 1:] if has_rollout else None, **options, **denominators)
            if loss_head == "fused":
                weight = head.weight
                loss, metrics = linear_grpo_loss(output[:, :-1].to(weight.dtype), weight, *inputs,
                                                 hidden_grad_all_reduce=not head.sequence_parallel, **common)
            else:
                loss, metrics = vocab_parallel_grpo_loss(output[:, :-1], *inputs, **common)
            n = metrics["tokens"].detach()
            report = {"loss": loss.detach().double(), "tokens": n.double(), "ratio_max": metrics["ratio_max"].double(),
                      **{k: (metrics[k] * n).double() for k in metric_keys}}
            return loss, n.to(torch.int), report

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            self._replay(mb)
            out = model(mb["input_ids"], mb["position_ids"], None, padding_mask=mb["padding_mask"])
            return out, lambda output: loss_func(mb, output)

        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            with head if loss_head == "fused" else contextlib.nullcontext():
                results = self._run(forward_step, micro_batches, forward_only=False)
        finally:
            if self.router_replay is not None:
                self.router_replay.clear()
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            self.step += 1

        sums = torch.zeros(2 + len(metric_keys), dtype=torch.float64, device=self.device)
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.layout.is_last_stage:
            for r in results:
                sums += torch.stack([r["loss"], r["tokens"]] + [r[k] for k in metric_keys])
                ratio_max = torch.maximum(ratio_max, r["ratio_max"])
        if self.layout.dp > 1:
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
            dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        packed = self._from_last_stage(torch.cat([sums, ratio_max.view(1)]))
        weight = max(float(packed[1]), 1.0)
        out = {"loss": float(packed[0]), "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
               "lr": lr, "tokens": tokens, "sequences": sequences}
        out.update({k: float(packed[2 + i]) / weight for i, k in enumerate(metric_keys)})
        out.update(ratio_max=float(packed[-1]), update_successful=float(bool(ok)), step=float(self.step))
        return out

    def sft_step(self, batch: Mapping[str, Any], *, split_dp: bool = True, micro_batch_size: Optional[int] = None,
                 micro_batch_tokens: Optional[int] = None, balance: str = "karmarkar-karp") -> dict[str, float]:
        """One optimizer step on the mean negative log-likelihood of the loss tokens of `batch`.

        batch: ``input_ids``, ``attention_mask`` and ``loss_mask`` ([S, T]; loss_mask[s, t] counts
        token t, predicted from t - 1, so it is 0 at t = 0 and on padding), optionally
        ``segment_ids`` ([S, T]: packed rows, see r1mega.models.packing). The loss is
        sum(-log p) / (loss tokens of the whole batch, over micro-batches and data-parallel
        ranks), at temperature 1, from the output layer's vocabulary-parallel logits.
        Micro-batches and ``balance`` as in :meth:`logprobs`.

        Metrics: ``loss``, ``grad_norm`` (before clipping), ``lr``, ``tokens`` (loss tokens),
        ``update_successful``, ``step``.
        """
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from r1mega.algo.checks import check_shape
        from r1mega.ops.vocab_parallel import vocab_parallel_token_logprobs

        if self.optimizer is None:
            raise RuntimeError("sft_step: this policy was loaded with trainable=False")
        if self._offloaded is not None:
            raise RuntimeError("sft_step: the training state is offloaded; call onload_training_state() first")
        unknown = sorted(set(batch) - {"input_ids", "attention_mask", "loss_mask", "segment_ids"})
        if unknown:
            raise ValueError(f"sft_step: unknown batch key {unknown[0]!r}; keys: input_ids, attention_mask, loss_mask, "
                             "segment_ids")
        input_ids, am = self._check_ids(batch["input_ids"], batch.get("attention_mask"))
        mask = batch.get("loss_mask")
        if mask is None:
            raise ValueError("sft_step: batch has no 'loss_mask'")
        check_shape("loss_mask", mask, input_ids.shape, like="input_ids")
        mask = mask != 0
        if (mask & ~am).any() or mask[:, 0].any():
            raise ValueError("loss_mask: must be 0 at t = 0 and on padding (attention_mask 0)")
        tensors = {"input_ids": input_ids, "attention_mask": am, "loss_mask": mask}
        packed = batch.get("segment_ids") is not None
        if packed:
            tensors["segment_ids"] = self._check_segments(batch["segment_ids"], am)
        lengths = am.sum(1).tolist()
        plan = self._plan(lengths, split_dp, mbs=micro_batch_size or self.micro_batch_size, budget=micro_batch_tokens,
                          balance=balance)
        micro_batches = self._micro_batches(tensors, plan, lengths)
        mine = torch.as_tensor(sorted(i for rows in plan for i in rows), dtype=torch.long)
        count = mask[mine].sum().double().view(1).to(self.device)
        if self.layout.dp > 1:
            dist.all_reduce(count, group=ps.get_data_parallel_group())
        tokens = float(count)
        tp_group = ps.get_tensor_model_parallel_group() if self.layout.tp > 1 else None
        rope = PackedRope(self.model) if packed else contextlib.nullcontext()

        def loss_func(mb, logits):
            logp = vocab_parallel_token_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], group=tp_group,
                                                 temperature=1.0, backend=self.backend)
            m = mb["loss_mask"][:, 1:]
            loss = -torch.where(m, logp, torch.zeros_like(logp)).sum() / max(tokens, 1.0)
            n = m.sum()
            return loss, n.to(torch.int), {"loss": loss.detach().double(), "tokens": n.double()}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return self._forward(model, mb, rope), lambda output: loss_func(mb, output)

        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        with rope:
            results = self._run(forward_step, micro_batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            self.step += 1
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.layout.is_last_stage:
            for r in results:
                total += r["loss"]
        if self.layout.dp > 1:
            dist.all_reduce(total, group=ps.get_data_parallel_group())
        total = self._from_last_stage(total)
        return {"loss": float(total), "grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "lr": lr,
                "tokens": tokens, "update_successful": float(bool(ok)), "step": float(self.step)}

    # ---- colocation ------------------------------------------------------------------------
    def _training_state(self) -> list[tuple[torch.Tensor, bool]]:
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

    def offload_training_state(self) -> int:
        """Release the device memory of the optimizer states and gradient buffers (before a
        colocated engine wakes); the optimizer states go to host memory. Returns the bytes
        released. :meth:`onload_training_state` restores them; a step in between raises."""
        if self.optimizer is None:
            return 0
        if self._offloaded is not None:
            raise RuntimeError("offload_training_state: already offloaded; call onload_training_state() first")
        pin = self.device.type == "cuda"
        self._offloaded, freed = [], 0
        for tensor, keep in self._training_state():
            storage = tensor.untyped_storage()
            host = tensor.detach().to("cpu", copy=True).pin_memory() if keep and pin else \
                (tensor.detach().to("cpu", copy=True) if keep else None)
            self._offloaded.append((tensor, storage.nbytes(), host))
            freed += storage.nbytes()
            storage.resize_(0)
        return freed

    def onload_training_state(self) -> None:
        """Undo :meth:`offload_training_state` (a no-op when nothing is offloaded)."""
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

    # ---- weights out -----------------------------------------------------------------------
    def weight_stream(self, *, dtypes: Optional[dict[str, str]] = None,
                      dst_ranks: Optional[Sequence[int]] = None):
        """The :class:`~r1mega.models.buckets.WeightStream` of this policy (collective the first time
        for a set of options; kept and reused, so a refit every step plans once)."""
        from r1mega.models.buckets import WeightStream

        dtypes = {**self.hf_dtypes, **(dtypes or {})}
        key = (tuple(sorted(dtypes.items())), None if dst_ranks is None else tuple(sorted(set(dst_ranks))))
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = WeightStream(self.model, self.desc, dtypes=dtypes, dst_ranks=dst_ranks)
        return stream

    def hf_weight_buckets(self, bucket_bytes: int, *, dtypes: Optional[dict[str, str]] = None,
                          dst_ranks: Optional[Sequence[int]] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full Hugging Face-named tensors in buckets of at most `bucket_bytes`, in layer order.

        The tensors, dtypes (default: the source's, as :meth:`export_hf` writes) and bytes of
        the HF export; every rank iterates, the ranks in `dst_ranks` (default: all) receive. See
        :mod:`r1mega.models.buckets` for the plan (made once), the gathering and the memory bound.
        """
        return self.weight_stream(dtypes=dtypes, dst_ranks=dst_ranks).buckets(bucket_bytes)

    def export_hf(self, out_dir: str | Path) -> list[str]:
        """Write a Hugging Face directory (safetensors in the source dtypes, config, tokenizer)."""
        import torch.distributed as dist

        from r1mega.models.hf_checkpoint import export_hf_weights

        out_dir = Path(out_dir)
        config_file = self.side_files / "config.json" if self.side_files else None
        config_json = config_file.read_text() if config_file and config_file.is_file() else None
        written = export_hf_weights(self.model, self.desc, out_dir, dtypes=self.hf_dtypes, config_json=config_json)
        if dist.get_rank() == 0:
            self._copy_side_files(out_dir, skip_config=True)
        dist.barrier()
        return written

    def _copy_side_files(self, dest: Path, *, skip_config: bool = False) -> None:
        import json

        from r1mega.models.hf_checkpoint import copy_files, hf_side_files
        from r1mega.utils.io import atomic_write_text

        dest.mkdir(parents=True, exist_ok=True)
        files = hf_side_files(self.side_files) if self.side_files and self.side_files.is_dir() else []
        files = [f for f in files if not (skip_config and f.name == "config.json")]
        copy_files(files, dest)
        if not skip_config and not (dest / "config.json").exists():
            atomic_write_text(dest / "config.json", json.dumps(self.desc.config, indent=2) + "\n")

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, root: str | Path, *, data_state: Optional[dict] = None,
                        keep_last: Optional[int] = None) -> Path:
        """Save as ``root/step_N/`` (N = self.step) atomically; see :mod:`r1mega.models.checkpoint`."""
        from r1mega.models.checkpoint import save_checkpoint

        return save_checkpoint(self, root, data_state=data_state, keep_last=keep_last)
