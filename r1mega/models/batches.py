"""A policy's batches: their checks, and their split into this rank's micro-batches.

The checks (:func:`check_input_ids`, :func:`check_segment_ids`, :func:`parse_grpo_batch`,
:func:`parse_sft_batch`) raise ValueError naming the bad key before any collective runs. The split
is two steps: :func:`plan_micro_batches` chooses this rank's rows of every micro-batch (balanced
over data parallelism by token count, or contiguous row blocks) and :func:`build_micro_batches`
cuts and pads their tensors for megatron's schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from r1mega.algo.checks import check_integer, check_shape
from r1mega.batching import pack_microbatches
from r1mega.megatron_compat import megatron_has_te
from r1mega.models.packing import check_segments

REQUIRED_TENSORS = ("input_ids", "attention_mask", "completion_mask", "old_logp", "advantages")
OPTIONAL_TENSORS = ("ref_logp", "rollout_logp")
SFT_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def check_input_ids(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention mask as bool) of right-padded [S, T] rows (T >= 2) with ids in
    [0, vocab_size) where the mask is 1; a missing mask is all ones."""
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
    if ((input_ids < 0) | (input_ids >= vocab_size))[am].any():
        raise ValueError(f"input_ids: token ids must be in [0, {vocab_size}) where attention_mask is 1")
    return input_ids, am


def check_segment_ids(segment_ids: torch.Tensor, am: torch.Tensor, *, packed_format: str = "mask") -> torch.Tensor:
    """`segment_ids` of packed rows (r1mega.models.packing) as int64, checked against the mask;
    NotImplementedError for the "mask" format under Transformer Engine, whose fused attention
    ignores the block mask (the "thd" format is what TE computes packed rows with)."""
    check_integer("segment_ids", segment_ids)
    check_segments(segment_ids, am)
    if packed_format == "mask" and megatron_has_te():
        # TE's fused attention ignores an explicit mask under the causal mask type.
        raise NotImplementedError("packed rows (segment_ids) with Transformer Engine need the THD format: "
                                  "set policy.packed_format=thd (or auto)")
    return segment_ids.long()


def parse_grpo_batch(batch: Mapping[str, Any], vocab_size: int) -> dict[str, torch.Tensor]:
    """The tensors of a GRPO batch (see Policy.train_step), all keys checked.

    The tensors are ``input_ids``, ``attention_mask`` and ``completion_mask`` (bool), ``old_logp``,
    ``advantages`` and the optional ``ref_logp`` / ``rollout_logp`` (float32); ``routes`` is left
    to the caller, which knows whether router replay is on.
    """
    unknown = sorted(set(batch) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS) - {"routes"})
    if unknown:
        raise ValueError(f"train_step: unknown batch key {unknown[0]!r}; tensors: "
                         f"{', '.join(REQUIRED_TENSORS + OPTIONAL_TENSORS + ('routes',))} (the loss options are "
                         "the LossSpec argument)")
    missing = [k for k in REQUIRED_TENSORS if batch.get(k) is None]
    if missing:
        raise ValueError(f"train_step: batch has no {missing[0]!r}")
    input_ids, am = check_input_ids(batch["input_ids"], batch["attention_mask"], vocab_size)
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
    return tensors


def parse_sft_batch(batch: Mapping[str, Any], vocab_size: int, *, packed_format: str = "mask") -> dict[str, torch.Tensor]:
    """The tensors of an SFT batch (see Policy.sft_step), all keys checked: ``input_ids``,
    ``attention_mask`` and ``loss_mask`` (bool), and ``segment_ids`` for packed rows (see
    :func:`check_segment_ids` for `packed_format`)."""
    unknown = sorted(set(batch) - set(SFT_KEYS))
    if unknown:
        raise ValueError(f"sft_step: unknown batch key {unknown[0]!r}; keys: {', '.join(SFT_KEYS)}")
    input_ids, am = check_input_ids(batch["input_ids"], batch.get("attention_mask"), vocab_size)
    mask = batch.get("loss_mask")
    if mask is None:
        raise ValueError("sft_step: batch has no 'loss_mask'")
    check_shape("loss_mask", mask, input_ids.shape, like="input_ids")
    mask = mask != 0
    if (mask & ~am).any() or mask[:, 0].any():
        raise ValueError("loss_mask: must be 0 at t = 0 and on padding (attention_mask 0)")
    tensors = {"input_ids": input_ids, "attention_mask": am, "loss_mask": mask}
    if batch.get("segment_ids") is not None:
        tensors["segment_ids"] = check_segment_ids(batch["segment_ids"], am, packed_format=packed_format)
    return tensors


# ---------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------
def plan_micro_batches(lengths: Sequence[int], layout, device: torch.device, *, split_dp: bool, mbs: Optional[int],
                       budget: Optional[int], balance: str = "karmarkar-karp") -> list[list[int]]:
    """This rank's micro-batches, each a list of row indices into the rows the caller passed.

    `lengths` are the rows' real tokens; `layout` is this rank's r1mega.parallel Layout. Every
    data-parallel rank gets the same number of micro-batches (lockstep schedules; collective over
    the data-parallel group when the count may differ); some may be empty. ``budget`` (tokens):
    each rank's share is split into micro-batches of at most ``budget`` real tokens by
    r1mega.batching.pack_microbatches; with ``balance`` "karmarkar-karp" the shares are balanced
    by token count, with "none" they are contiguous row blocks. Otherwise ``mbs`` rows each, from
    contiguous row blocks (``split_dp``: this data-parallel rank's block of the rows only).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp, dp_rank, n_rows = layout.dp, layout.dp_rank, len(lengths)
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
    most = torch.tensor([count], device=device)
    if dp > 1:
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return plan + [[] for _ in range(max(1, int(most)) - count)]


def plan_rows(plan: list[list[int]]) -> torch.Tensor:
    """Every row of a plan (this rank's rows), sorted, as an index tensor."""
    return torch.as_tensor(sorted(i for rows in plan for i in rows), dtype=torch.long)


def build_micro_batches(tensors: dict[str, torch.Tensor], plan: list[list[int]], lengths: Sequence[int], layout,
                        device: torch.device, *, sequence_parallel: bool) -> list[dict]:
    """The micro-batches of `plan`: each a dict of its rows' tensors on `device`, plus ``rows``
    (indices into the caller's rows), ``position_ids`` and ``padding_mask`` (this stage's).

    Each micro-batch is cut to its own longest row (right padding beyond it changes nothing:
    attention is causal); an empty micro-batch is one fully masked row. Under pipeline parallelism
    all are padded to the largest one's rows and length; under sequence parallelism the length
    is a multiple of tp.
    """
    out = []
    # Pipeline stages exchange activations of one fixed shape: there, every micro-batch is
    # padded to the largest one's rows and length.
    fixed = layout.pp > 1
    most_rows = max([1] + [len(rows) for rows in plan])
    longest = max([2] + [int(lengths[i]) for rows in plan for i in rows])
    for rows in plan:
        seq = _padded_len(longest if fixed else max([2] + [int(lengths[i]) for i in rows]), layout, sequence_parallel)
        n = most_rows if fixed else max(1, len(rows))
        idx = torch.as_tensor(rows, dtype=torch.long)
        mb = {}
        for name, t in tensors.items():
            part = t[idx.to(t.device)]
            if part.dim() >= 2:
                part = part[:, :seq]
            mb[name] = _pad(part.to(device), n, seq if part.dim() >= 2 else None)
        mb["rows"] = rows
        mb["position_ids"] = torch.arange(seq, device=device).unsqueeze(0).expand(mb["input_ids"].shape[0], seq)
        mb["padding_mask"] = _stage_padding_mask(~mb["attention_mask"], layout, sequence_parallel)
        out.append(mb)
    return out


def _padded_len(seq: int, layout, sequence_parallel: bool) -> int:
    tp = layout.tp
    return -(-seq // tp) * tp if sequence_parallel else seq


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


def _stage_padding_mask(padding_mask: torch.Tensor, layout, sequence_parallel: bool) -> torch.Tensor:
    # GPTModel scatters the [B, T] padding mask over the sequence-parallel ranks on the first
    # stage only; later stages get it as given, so they must get this rank's slice.
    if layout.is_first_stage or not sequence_parallel:
        return padding_mask
    seq, tp, r = padding_mask.shape[1], layout.tp, layout.tp_rank
    return padding_mask[:, r * seq // tp: (r + 1) * seq // tp].contiguous()
