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

The Policy ties together modules with a public API each: where a path's model is
(:mod:`r1mega.models.sources`), the batch checks and micro-batch split
(:mod:`r1mega.models.batches`), the pipeline schedule's passes and metric reductions
(:mod:`r1mega.models.runner`), the optimizer and its state (:mod:`r1mega.models.optimizer`) and
the weight export (:mod:`r1mega.models.export`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.algo.loss_spec import LossSpec
from r1mega.config import ConfigError, OptimConfig, ParallelConfig, PolicyConfig
from r1mega.models import checkpoint as ckpt
from r1mega.models.batches import (
    build_micro_batches,
    check_input_ids,
    check_segment_ids,
    parse_grpo_batch,
    parse_sft_batch,
    plan_micro_batches,
    plan_rows,
)
from r1mega.models.build import build_model
from r1mega.models.checkpoint import save_checkpoint
from r1mega.models.export import WeightExport
from r1mega.models.hf_checkpoint import check_hf_checkpoint, load_hf_weights
from r1mega.models.hf_config import ModelDesc, describe_hf_model
from r1mega.models.optimizer import TrainingState
from r1mega.models.runner import ModelRunner, grpo_metric_keys
from r1mega.models.sources import resolve_source
from r1mega.models.transformer_config import transformer_engine_available
from r1mega.parallel.state import current_layout, init_parallel

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _ensure_parallel(parallel: ParallelConfig, seed: int):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
               ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if now == (parallel.tp, parallel.pp, parallel.ep, parallel.expert_tp):
            return current_layout()
    return init_parallel(parallel, seed=seed)


def resolve_packed_format(packed_format: str) -> str:
    """``policy.packed_format`` for this machine: "auto" is "thd" with Transformer Engine (its
    fused attention takes cu_seqlens) and "mask" otherwise (the local attention's dense mask)."""
    if packed_format == "auto":
        return "thd" if transformer_engine_available() else "mask"
    return packed_format


def load_policy(path: str | Path, *, tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None,
                parallel: Optional[ParallelConfig] = None, dtype: torch.dtype = torch.float32,
                optim: Optional[OptimConfig] = None, trainable: bool = True, micro_batch_size: int = 1,
                temperature: float = 1.0, seed: int = 0, backend: Optional[str] = None,
                load_optimizer: bool = True, router_replay: bool = False, policy: Optional[PolicyConfig] = None,
                total_steps: Optional[int] = None, **config_overrides) -> Policy:
    """A :class:`Policy` for `path` in the layout tp/ep/pp (or `parallel`); call on every rank.

    Initialises ``torch.distributed`` (torchrun's environment, or a one-process group) and
    megatron's groups unless they already hold this layout (re-initialising for another layout
    invalidates policies built in the old one). `dtype` is the parameter dtype (float32 or
    bfloat16; Adam keeps fp32 main weights). `trainable=False` builds no optimizer (a reference
    or rollout-side model). `optim` (default :class:`~r1mega.config.OptimConfig`) sets Adam,
    weight decay, gradient clipping and the learning-rate schedule, whose decay (optim.lr_decay)
    ends at optim.decay_steps, else at `total_steps` (the run's optimizer steps). `load_optimizer=False` restores a checkpoint's
    weights and step count only (fresh Adam moments, scheduler and RNG). `config_overrides` go to
    megatron's TransformerConfig. `router_replay=True` (MoE models) lets log-probs and training
    steps take the rollout engine's recorded expert choices (``routes``; see
    :mod:`r1mega.models.router_replay`). `policy` (default :class:`~r1mega.config.PolicyConfig`)
    chooses grouped-GEMM experts, FP8 and the packed-sequence format (``auto``: THD with
    Transformer Engine, the block mask otherwise).
    Problems with `path` (not a model, a bad tensor) raise before any process group is set up.
    """
    if parallel is None:
        parallel = ParallelConfig(tp=tp, ep=ep, pp=pp, etp=etp)
    elif (tp, ep, pp, etp) != (1, 1, 1, None):
        raise ConfigError("load_policy: pass either parallel= or tp/ep/pp/etp, not both")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"load_policy: dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}")
    source = resolve_source(path)
    desc = describe_hf_model(source.config_dir)
    hf_dtypes = source.hf_dtypes
    if source.kind == "hf":
        check_hf_checkpoint(source.path, desc)
    _ensure_parallel(parallel, seed)
    layers = policy or PolicyConfig()
    model = build_model(desc, parallel, dtype=_DTYPE_NAMES[dtype], calculate_per_token_loss=True, policy=layers,
                        **config_overrides)
    if source.kind == "hf":
        hf_dtypes = load_hf_weights(model, desc, source.path).dtypes
    else:
        ckpt.load_model_weights(model, source.weights)
    policy = Policy(model, desc, parallel, dtype=dtype, hf_dtypes=hf_dtypes, side_files=source.config_dir,
                    optim=optim, trainable=trainable, micro_batch_size=micro_batch_size,
                    temperature=temperature, backend=backend, seed=seed,
                    packed_format=resolve_packed_format(layers.packed_format), total_steps=total_steps)
    if router_replay:
        policy.enable_router_replay()
    if source.kind == "checkpoint":
        report = ckpt.load_checkpoint(policy, source.path, load_optimizer=load_optimizer, load_model=False)
        policy.data_state = report.data_state
        policy.load_report = report
    return policy


class Policy:
    """One rank's part of a megatron GPT model, with its optimizer; built by :func:`load_policy`.

    Every method is collective: call it on every rank with the same arguments (with
    ``split_dp=False``, the same within each data-parallel replica).

    Attributes: ``desc`` (ModelDesc), ``parallel`` (ParallelConfig), ``layout`` (this rank's
    Layout), ``model`` (the GPTModel), ``optimizer`` / ``scheduler`` (None when not trainable),
    ``step`` (optimizer steps taken), ``data_state`` (what the loaded checkpoint's caller saved),
    ``hf_dtypes`` (safetensors dtype of every HF tensor, from the source). Its parts:
    ``runner`` (the :class:`~r1mega.models.runner.ModelRunner`), ``training_state`` (the
    :class:`~r1mega.models.optimizer.TrainingState`, None when not trainable) and ``weights``
    (the :class:`~r1mega.models.export.WeightExport`).
    """

    def __init__(self, model, desc: ModelDesc, parallel: ParallelConfig, *, dtype: torch.dtype,
                 hf_dtypes: Optional[dict], side_files: Optional[Path], optim: Optional[OptimConfig],
                 trainable: bool, micro_batch_size: int, temperature: float, backend: Optional[str], seed: int,
                 packed_format: str = "mask", total_steps: Optional[int] = None):
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.model, self.desc, self.parallel = model, desc, parallel
        self.layout = current_layout()
        self.dtype, self.dtype_name = dtype, _DTYPE_NAMES[dtype]
        self.side_files = side_files
        self.weights = WeightExport(model, desc, hf_dtypes=hf_dtypes, side_files=side_files)
        self.hf_dtypes = self.weights.hf_dtypes
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
        self.runner = ModelRunner(model, desc, self.layout, temperature=self.temperature, backend=self.backend,
                                  packed_format=packed_format)
        self.training_state: Optional[TrainingState] = None
        if trainable:
            self.training_state = TrainingState(model, self.optim, dtype, total_steps)
            self.runner.chunk = self.training_state.ddp

    @property
    def optimizer(self):
        """megatron's distributed optimizer (None when not trainable)."""
        return None if self.training_state is None else self.training_state.optimizer

    @property
    def scheduler(self):
        """megatron's OptimizerParamScheduler (None when not trainable)."""
        return None if self.training_state is None else self.training_state.scheduler

    def _trainable_state(self, what: str) -> TrainingState:
        if self.training_state is None:
            raise RuntimeError(f"{what}: this policy was loaded with trainable=False")
        if self.training_state.offloaded:
            raise RuntimeError(f"{what}: the training state is offloaded; call onload_training_state() first")
        return self.training_state

    def _plan(self, lengths: list[int], split_dp: bool, micro_batch_size: Optional[int],
              micro_batch_tokens: Optional[int], balance: str) -> list[list[int]]:
        return plan_micro_batches(lengths, self.layout, self.device, split_dp=split_dp,
                                  mbs=micro_batch_size or self.micro_batch_size, budget=micro_batch_tokens,
                                  balance=balance)

    def _micro_batches(self, tensors: dict, plan: list[list[int]], lengths: list[int]) -> list[dict]:
        return build_micro_batches(tensors, plan, lengths, self.layout, self.device,
                                   sequence_parallel=self.runner.sequence_parallel)

    # ---- router replay ---------------------------------------------------------------------
    @property
    def router_replay(self):
        """The :class:`~r1mega.models.router_replay.RouterReplay` once enabled, else None."""
        return self.runner.router_replay

    def enable_router_replay(self) -> None:
        """Let log-probs and training steps replay recorded expert choices (MoE models)."""
        self.runner.enable_router_replay()

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
        input_ids, am = check_input_ids(input_ids, attention_mask, self.desc.vocab_size)
        lengths = am.sum(1).tolist()
        plan = self._plan(lengths, split_dp, micro_batch_size, micro_batch_tokens, balance)
        tensors = {"input_ids": input_ids, "attention_mask": am}
        if routes is not None:
            tensors["routes"] = self.runner.check_routes(routes, input_ids.shape)
        if segment_ids is not None:
            tensors["segment_ids"] = check_segment_ids(segment_ids, am, packed_format=self.runner.packed_format)
        micro_batches = self._micro_batches(tensors, plan, lengths)
        full = self.runner.logprobs(micro_batches, tuple(input_ids.shape), split_dp=split_dp,
                                    packed=segment_ids is not None)
        full[:, 0] = 0.0
        return full.masked_fill(~am.to(full.device), 0.0).to(input_ids.device)

    # ---- training --------------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, torch.Tensor], spec: LossSpec, *, split_dp: bool = True,
                   micro_batch_size: Optional[int] = None,
                   micro_batch_tokens: Optional[int] = None, balance: str = "karmarkar-karp",
                   loss_head: str = "fused") -> dict[str, float]:
        """One optimizer step on the GRPO loss `spec` of `batch`; returns metrics (the same on every rank).

        batch (tensors only): ``input_ids``, ``attention_mask``, ``completion_mask``, ``old_logp``
        (all [S, T], aligned as in the module docstring), ``advantages`` ([S] or [S, T]), optionally
        ``ref_logp`` and ``rollout_logp`` ([S, T]) and ``routes``. spec: the
        :class:`~r1mega.algo.LossSpec`; ``seq-mean-token-sum-norm`` needs its ``norm_length`` (the rows
        hold prompts too, so T is no completion length). The denominators are global.

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
        if loss_head not in ("fused", "logits"):
            raise ValueError(f"train_step: loss_head must be 'fused' or 'logits', got {loss_head!r}")
        state = self._trainable_state("train_step")
        if spec.agg == "seq-mean-token-sum-norm" and spec.norm_length is None:
            raise ValueError("train_step: agg='seq-mean-token-sum-norm' needs norm_length (the [S, T] rows hold "
                             "prompts too, so T is no completion length)")
        spec.check_inputs(has_ref=batch.get("ref_logp") is not None, has_rollout=batch.get("rollout_logp") is not None)
        tensors = parse_grpo_batch(batch, self.desc.vocab_size)
        if batch.get("routes") is not None:
            tensors["routes"] = self.runner.check_routes(batch["routes"], tensors["input_ids"].shape)
        lengths = tensors["attention_mask"].sum(1).tolist()
        plan = self._plan(lengths, split_dp, micro_batch_size, micro_batch_tokens, balance)
        micro_batches = self._micro_batches(tensors, plan, lengths)
        # Global denominators: counts of every micro-batch of every data-parallel rank.
        tokens, sequences = self.runner.global_counts(tensors["completion_mask"], plan_rows(plan))
        denominators = ({"global_tokens": max(tokens, 1.0)} if spec.agg == "token-mean"
                        else {"global_sequences": max(sequences, 1.0)})
        metric_keys = grpo_metric_keys("ref_logp" in tensors, "rollout_logp" in tensors)

        lr = state.lr
        state.zero_grad()
        results = self.runner.grpo_backward(micro_batches, spec=spec, denominators=denominators,
                                            metric_keys=metric_keys, loss_head=loss_head)
        ok, grad_norm = state.step()
        if ok:
            self.step += 1
        packed = self.runner.reduce_grpo_metrics(results, metric_keys)
        weight = max(float(packed[1]), 1.0)
        out = {"loss": float(packed[0]), "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "sequences": sequences}
        out.update({k: float(packed[2 + i]) / weight for i, k in enumerate(metric_keys)})
        out.update(ratio_max=float(packed[-1]), update_successful=float(ok), step=float(self.step))
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
        state = self._trainable_state("sft_step")
        tensors = parse_sft_batch(batch, self.desc.vocab_size, packed_format=self.runner.packed_format)
        lengths = tensors["attention_mask"].sum(1).tolist()
        plan = self._plan(lengths, split_dp, micro_batch_size, micro_batch_tokens, balance)
        micro_batches = self._micro_batches(tensors, plan, lengths)
        tokens = self.runner.global_loss_tokens(tensors["loss_mask"], plan_rows(plan))

        lr = state.lr
        state.zero_grad()
        results = self.runner.sft_backward(micro_batches, tokens=tokens, packed="segment_ids" in tensors)
        ok, grad_norm = state.step()
        if ok:
            self.step += 1
        return {"loss": self.runner.reduce_loss(results), "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                "update_successful": float(ok), "step": float(self.step)}

    # ---- colocation ------------------------------------------------------------------------
    def offload_training_state(self) -> int:
        """Release the device memory of the optimizer states and gradient buffers (before a
        colocated engine wakes); the optimizer states go to host memory. Returns the bytes
        released. :meth:`onload_training_state` restores them; a step in between raises."""
        if self.training_state is None:
            return 0
        return self.training_state.offload()

    def onload_training_state(self) -> None:
        """Undo :meth:`offload_training_state` (a no-op when nothing is offloaded)."""
        if self.training_state is not None:
            self.training_state.onload()

    # ---- weights out -----------------------------------------------------------------------
    def weight_stream(self, *, dtypes: Optional[dict[str, str]] = None,
                      dst_ranks: Optional[Sequence[int]] = None):
        """The :class:`~r1mega.models.buckets.WeightStream` of this policy (collective the first time
        for a set of options; kept and reused, so a refit every step plans once)."""
        return self.weights.stream(dtypes=dtypes, dst_ranks=dst_ranks)

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
        return self.weights.export_hf(out_dir)

    def write_side_files(self, dest: Path) -> None:
        """Write the source's non-weight files (config.json, tokenizer, ...) into `dest`, from one
        rank: a checkpoint's ``hf/``, which :func:`load_policy` reads the model's config from."""
        self.weights.write_side_files(dest)

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, root: str | Path, *, data_state: Optional[dict] = None,
                        keep_last: Optional[int] = None) -> Path:
        """Save as ``root/step_N/`` (N = self.step) atomically; see :mod:`r1mega.models.checkpoint`."""
        return save_checkpoint(self, root, data_state=data_state, keep_last=keep_last)
