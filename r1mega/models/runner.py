"""The model runner: a policy's micro-batches forward (and backward) through megatron's pipeline schedule.

:class:`ModelRunner` holds one rank's model in its layout and runs the three passes a policy
needs, each over micro-batches from :mod:`r1mega.models.batches`:

* :meth:`~ModelRunner.logprobs`: forward only, log-probs from the vocabulary-parallel logits;
* :meth:`~ModelRunner.grpo_backward`: the GRPO loss from the last stage's final hidden states and
  the output layer's vocabulary shard (:func:`r1mega.ops.linear_grpo_loss`; never [N, V] logits),
  or from the logits for comparison;
* :meth:`~ModelRunner.sft_backward`: the negative log-likelihood of the loss tokens.

Losses carry GLOBAL denominators (:meth:`~ModelRunner.global_counts`: all-reduced over data
parallelism), so the schedule sums micro-batch losses and DDP sums gradients: gradient
accumulation and data parallelism are exact. Results live on the last pipeline stage; the
``reduce_*`` methods sum them over data parallelism and broadcast them over the pipeline, so every
rank returns the same values. Router replay (MoE) feeds recorded expert choices to each
micro-batch's forward.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from r1mega.algo.clipped_loss import local_denominators
from r1mega.algo.loss_spec import LossSpec
from r1mega.megatron_compat import fix_expert_bias_padding
from r1mega.models.build import unwrap_model
from r1mega.models.hf_config import ModelDesc
from r1mega.models.packing import PackedRope, ThdBatch, block_causal_mask, segment_positions
from r1mega.models.router_replay import RouterReplay, check_routes
from r1mega.ops.linear import linear_grpo_loss
from r1mega.ops.vocab_parallel import vocab_parallel_grpo_loss, vocab_parallel_token_logprobs

MEAN_METRICS = ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl")


def grpo_metric_keys(has_ref: bool, has_rollout: bool) -> tuple[str, ...]:
    """The policy-loss metrics a GRPO step reports as token-weighted means."""
    return MEAN_METRICS + (("kl_mean",) if has_ref else ()) + (("tis_weight_mean",) if has_rollout else ())


class _HiddenStatesOut:
    """While active, the last stage's output layer returns its input, so the model's output is
    the final hidden states [b, s, h] (sequence-gathered under sequence parallelism, whose
    backward reduce-scatters the partial gradients) and the loss takes them with ``weight``
    (the output layer's vocabulary shard, or the tied embedding) through the fused linear op."""

    def __init__(self, model, is_last_stage: bool, tp_group):
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


class ModelRunner:
    """Runs this rank's part of `model` (layout `layout`) through megatron's schedule; every
    method is collective over the model's groups.

    `temperature` divides the logits of log-probs and the GRPO loss; `backend` picks the ops'
    implementation (r1mega.ops). `packed_format` is how a micro-batch reaches attention: "mask"
    (padded [B, T] rows; packed rows get a block-diagonal mask and per-example positions) or
    "thd" (the real tokens of every sequence back to back with cu_seqlens, megatron's
    PackedSeqParams: no padding computed; outputs are unpacked to [B, T] for the losses).
    ``chunk`` is the module the schedule runs: the model, or its DDP wrapper once a training
    state exists. ``router_replay`` is None until :meth:`enable_router_replay`.
    """

    def __init__(self, model, desc: ModelDesc, layout, *, temperature: float, backend: Optional[str],
                 packed_format: str = "mask"):
        if packed_format not in ("mask", "thd"):
            raise ValueError(f"packed_format must be 'mask' or 'thd', got {packed_format!r}")
        self.model, self.desc, self.layout = model, desc, layout
        self.temperature, self.backend, self.packed_format = temperature, backend, packed_format
        self.device = next(model.parameters()).device
        self.chunk = model
        self.router_replay = None  # r1mega.models.router_replay.RouterReplay once enabled
        fix_expert_bias_padding(model)  # megatron-core 0.16.1's expert-bias update under padding

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.model.config.sequence_parallel)

    # ---- router replay ---------------------------------------------------------------------
    def enable_router_replay(self) -> None:
        """Let log-probs and training steps replay recorded expert choices (MoE models)."""
        if not self.desc.is_moe:
            raise ValueError(f"router replay needs an MoE model; {self.desc.arch} has no experts")
        if self.router_replay is None:
            moe_layers = tuple(i for i in range(self.desc.num_layers) if self.desc.is_moe_layer(i))
            self.router_replay = RouterReplay(unwrap_model(self.model), moe_layers, self.desc.moe.topk)

    def check_routes(self, routes: torch.Tensor, shape) -> torch.Tensor:
        """`routes` ([S, T, moe_layers, top_k] expert ids) checked for rows of `shape`; ValueError
        also when router replay is off."""
        if self.router_replay is None:
            raise ValueError("routes given, but the policy was loaded without router_replay=True")
        replay = self.router_replay
        check_routes(routes, tuple(shape), len(replay.moe_layers), replay.top_k, self.desc.moe.num_experts)
        return routes

    def _replay(self, mb: dict) -> None:
        if self.router_replay is None:
            return
        routes, mask = mb.get("routes"), mb["attention_mask"]
        if routes is not None and self.packed_format == "thd":  # the routers see the packed tokens
            thd = self._thd_batch(mb)
            routes, mask = thd.pack(routes), ~thd.padding_mask
        self.router_replay.set(routes, mask, tp=self.layout.tp, tp_rank=self.layout.tp_rank,
                               sequence_parallel=self.sequence_parallel)

    # ---- the schedule ----------------------------------------------------------------------
    def _run(self, forward_step, micro_batches: list[dict], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # The shape megatron's pipeline schedule communicates (all micro-batches share it when pp > 1).
        rows, seq = micro_batches[0]["input_ids"].shape
        if self.packed_format == "thd":  # one row of every token (_thd_total)
            rows, seq = 1, rows * seq
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.chunk],
            num_microbatches=len(micro_batches), seq_length=seq, micro_batch_size=rows, forward_only=forward_only)

    def _forward(self, model, mb: dict, rope):
        """The model on one micro-batch; packed rows get their block mask and per-example positions
        (or, in THD, their own sequences)."""
        if self.packed_format == "thd":
            return self._forward_thd(model, mb)
        if "segment_ids" not in mb:
            return model(mb["input_ids"], mb["position_ids"], None, padding_mask=mb["padding_mask"])
        segments = mb["segment_ids"]
        positions = segment_positions(segments)
        rope.set(positions)
        return model(mb["input_ids"], positions, block_causal_mask(segments), padding_mask=mb["padding_mask"])

    def _packed_rope(self):
        # THD restarts rotary positions per sequence through cu_seqlens (megatron's THD RoPE)
        return PackedRope(self.model) if self.packed_format == "mask" else contextlib.nullcontext()

    def _thd_total(self, mb: dict) -> int:
        """Tokens of a micro-batch in THD: its real tokens, rounded up to a multiple of the TP size
        under sequence parallelism; with pipeline parallelism every micro-batch's B * T (the one
        shape the stages exchange)."""
        rows, seq = mb["input_ids"].shape
        if self.layout.pp > 1:
            return rows * seq
        real = int(mb["attention_mask"].sum())
        step = self.layout.tp if self.sequence_parallel else 1
        return max(-(-real // step) * step, step)

    def _thd_batch(self, mb: dict) -> ThdBatch:
        """The micro-batch in THD, made once (router replay and the forward both need it)."""
        if "thd" not in mb:
            segments = mb.get("segment_ids")
            if segments is None:  # a row is one sequence
                segments = mb["attention_mask"].long()
            mb["thd"] = ThdBatch(mb["input_ids"], segments, total=self._thd_total(mb))
        return mb["thd"]

    def _forward_thd(self, model, mb: dict):
        thd = self._thd_batch(mb)
        padding_mask = thd.padding_mask
        if not self.layout.is_first_stage and self.sequence_parallel:
            # GPTModel scatters the padding mask over sequence-parallel ranks on the first stage only
            n, tp, r = padding_mask.shape[1], self.layout.tp, self.layout.tp_rank
            padding_mask = padding_mask[:, r * n // tp: (r + 1) * n // tp].contiguous()
        out = model(thd.input_ids, thd.position_ids, None, packed_seq_params=thd.packed_seq_params(),
                    padding_mask=padding_mask)
        return thd.unpack(out) if self.layout.is_last_stage else out

    def _from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast a tensor (of a shape every rank knows) from the last pipeline stage."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.layout.pp > 1:
            dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _reduce_over_dp(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """All-reduce `tensor` in place over the data-parallel group (a sum unless `op`)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.layout.dp > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=ps.get_data_parallel_group())
        return tensor

    def _tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group() if self.layout.tp > 1 else None

    # ---- log-probs -------------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, micro_batches: list[dict], shape: tuple[int, int], *, split_dp: bool,
                 packed: bool) -> torch.Tensor:
        """[S, T] float32 log-probs (position t from the logits at t - 1; column 0 and padding are
        not yet zeroed) of the rows of `shape`, on every rank. With `split_dp` each data-parallel
        rank computed its own rows and the results are summed over data parallelism."""
        from megatron.core import parallel_state as ps

        n_rows, seq = shape
        tp_group = ps.get_tensor_model_parallel_group()

        def loss_func(mb, output):
            logp = vocab_parallel_token_logprobs(output[:, :-1], mb["input_ids"][:, 1:], group=tp_group,
                                                 temperature=self.temperature, backend=self.backend)
            logp = torch.nn.functional.pad(logp.float(), (1, 0))
            return output.new_zeros(()), torch.zeros((), dtype=torch.int, device=self.device), {"logp": logp}

        rope = self._packed_rope() if packed else contextlib.nullcontext()

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
            if split_dp:  # each data-parallel rank filled its own rows
                self._reduce_over_dp(full)
        return self._from_last_stage(full.contiguous())

    # ---- GRPO ------------------------------------------------------------------------------
    def global_counts(self, mask: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
        """(completion tokens, sequences with any) of the rows `rows` of the [S, T] `mask` on every
        data-parallel rank together: the GRPO loss's global denominators."""
        local_mask = mask[rows][:, 1:]
        counts = torch.stack([
            local_denominators(local_mask, "token-mean")["global_tokens"],
            local_denominators(local_mask, "seq-mean-token-mean")["global_sequences"]]
        ).double().to(self.device)
        self._reduce_over_dp(counts)
        return float(counts[0]), float(counts[1])

    def grpo_backward(self, micro_batches: list[dict], *, spec: LossSpec, denominators: dict[str, float],
                      metric_keys: tuple[str, ...], loss_head: str) -> list[dict]:
        """Forward and backward of the GRPO loss over `micro_batches` (gradients accumulate in the
        model's buffers); returns the last stage's per-micro-batch results (loss, tokens,
        ratio_max, and each of `metric_keys` weighted by tokens). `loss_head` "fused" or "logits"."""
        has_ref, has_rollout = "ref_logp" in micro_batches[0], "rollout_logp" in micro_batches[0]
        tp_group = self._tp_group()
        head = _HiddenStatesOut(self.model, self.layout.is_last_stage, tp_group)

        def loss_func(mb, output):  # output: final hidden states (fused head) or logits
            adv = mb["advantages"] if mb["advantages"].dim() == 1 else mb["advantages"][:, 1:]
            inputs = (mb["input_ids"][:, 1:], mb["old_logp"][:, 1:], adv, mb["completion_mask"][:, 1:], spec)
            common = dict(temperature=self.temperature, backend=self.backend, group=tp_group,
                          ref_logp=mb["ref_logp"][:, 1:] if has_ref else None,
                          rollout_logp=mb["rollout_logp"][:, 1:] if has_rollout else None, **denominators)
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
            return self._forward(model, mb, None), lambda output: loss_func(mb, output)

        self.model.train()
        try:
            with head if loss_head == "fused" else contextlib.nullcontext():
                return self._run(forward_step, micro_batches, forward_only=False)
        finally:
            if self.router_replay is not None:
                self.router_replay.clear()

    def reduce_grpo_metrics(self, results: list[dict], metric_keys: tuple[str, ...]) -> torch.Tensor:
        """[loss, tokens, *metric_keys sums, ratio_max] over micro-batches and data-parallel ranks
        (ratio_max: the maximum), the same on every rank."""
        import torch.distributed as dist

        sums = torch.zeros(2 + len(metric_keys), dtype=torch.float64, device=self.device)
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.layout.is_last_stage:
            for r in results:
                sums += torch.stack([r["loss"], r["tokens"]] + [r[k] for k in metric_keys])
                ratio_max = torch.maximum(ratio_max, r["ratio_max"])
        self._reduce_over_dp(sums)
        self._reduce_over_dp(ratio_max, op=dist.ReduceOp.MAX)
        return self._from_last_stage(torch.cat([sums, ratio_max.view(1)]))

    # ---- SFT -------------------------------------------------------------------------------
    def global_loss_tokens(self, loss_mask: torch.Tensor, rows: torch.Tensor) -> float:
        """The loss tokens of the rows `rows` of `loss_mask` on every data-parallel rank together."""
        count = loss_mask[rows].sum().double().view(1).to(self.device)
        return float(self._reduce_over_dp(count))

    def sft_backward(self, micro_batches: list[dict], *, tokens: float, packed: bool) -> list[dict]:
        """Forward and backward of sum(-log p of loss tokens) / `tokens` (temperature 1) over
        `micro_batches`; returns the last stage's per-micro-batch results (loss, tokens)."""
        tp_group = self._tp_group()
        rope = self._packed_rope() if packed else contextlib.nullcontext()

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

        self.model.train()
        with rope:
            return self._run(forward_step, micro_batches, forward_only=False)

    def reduce_loss(self, results: list[dict]) -> float:
        """The sum of the micro-batches' losses over data-parallel ranks, the same on every rank."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.layout.is_last_stage:
            for r in results:
                total += r["loss"]
        self._reduce_over_dp(total)
        return float(self._from_last_stage(total))
