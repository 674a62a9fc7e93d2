"""Grouped-GEMM experts without Transformer Engine: the layout megatron's ``TEGroupedMLP`` keeps.

With ``moe_grouped_gemm=True`` megatron builds ``TEGroupedMLP``: each MoE layer's local experts
live in two grouped linears, ``mlp.experts.linear_fc1`` and ``mlp.experts.linear_fc2``, whose
parameters are ``weight0 .. weight{E_local-1}`` (expert j's [gate; up] rows of shape
[2 F / etp, H] for fc1, its [H, F / etp] down projection for fc2) instead of ``SequentialMLP``'s
``local_experts.j.linear_fc{1,2}.weight``. On a GPU with Transformer Engine the grouped linears are
TE's ``GroupedLinear`` (one grouped GEMM over all local experts, FP8-capable). Elsewhere megatron
would fall back to its deprecated ``GroupedMLP`` (bf16 only, the CUDA ``grouped_gemm`` package,
one fused weight buffer), so :func:`grouped_experts_spec` puts :class:`ColumnGroupedLinear` /
:class:`RowGroupedLinear` under the same ``TEGroupedMLP``: the same parameter names, shapes,
tensor-parallel sides, sharded state dict keys and ``allreduce`` tags as TE's, computed as one
matmul per expert. A policy, its checkpoints, HF import/export and the weight stream therefore
see exactly the layout they see on an H100 with TE, and the CPU suite tests it.

Like TE's grouped linear under megatron (``explicit_expert_comm``), these layers never
communicate: the token dispatcher moves tokens between expert-parallel and expert-tensor-parallel
ranks. Parameters carry no ``tensor_model_parallel`` tag (TE's do not either);
:mod:`r1mega.models.hf_mapping` knows fc1 is split along rows and fc2 along columns by name.
"""

from __future__ import annotations

from typing import Optional

import torch


class GroupedLinear(torch.nn.Module):
    """``num_gemms`` independent linears, ``weight{i}`` [out, in]; rows of the input are split
    among them by ``m_splits`` (tokens per local expert, in order). Forward returns (output, None)."""

    split_dim: int  # the dimension of weight{i} split over expert tensor parallelism

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: Optional[str] = None,
                 pg_collection=None):
        super().__init__()
        from megatron.core.tensor_parallel.utils import divide

        if bias:
            raise ValueError("grouped experts without Transformer Engine take no bias (add_bias_linear=False)")
        if not is_expert:
            raise ValueError("GroupedLinear only holds experts")
        self.num_gemms = num_gemms
        self._pg_collection = pg_collection
        self._tp_group = pg_collection.expt_tp
        tp_size = self._tp_group.size()
        if self.split_dim == 0:
            output_size = divide(output_size, tp_size)
        else:
            input_size = divide(input_size, tp_size)
        expert_parallel = config.expert_model_parallel_size > 1
        for i in range(num_gemms):
            weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                                    device=_param_device(config)))
            if config.perform_initialization:
                with torch.no_grad():
                    init_method(weight)
            # What TE's grouped linear sets: expert weights are reduced over the expert-DP group.
            weight.allreduce = not expert_parallel
            self.register_parameter(f"weight{i}", weight)
        # TE keeps one extra state per GEMM (FP8 scales) and checkpoints hold one object per expert
        # (SequentialMLP's linears have one each too); only the first is a state_dict key here.
        self._register_load_state_dict_pre_hook(_drop_per_gemm_extra_states)

    def get_extra_state(self):
        return None

    def set_extra_state(self, state) -> None:
        pass

    def forward(self, x: torch.Tensor, m_splits: list[int]):
        if len(m_splits) != self.num_gemms:
            raise ValueError(f"GroupedLinear: {len(m_splits)} splits for {self.num_gemms} experts")
        outs = [chunk @ getattr(self, f"weight{i}").t()
                for i, chunk in enumerate(torch.split(x, m_splits, dim=0))]
        return torch.cat(outs, dim=0), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Per-expert sharded tensors under TE's keys (``{prefix}weight{i}``), each placed at its
        global expert index and split along ``split_dim`` over expert tensor parallelism, so a
        checkpoint resharding to other layouts (or to TE's grouped linear) reads the same keys."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        singleton_local_shards = (metadata or {}).get("singleton_local_shards", False)
        ep_group = self._pg_collection.ep
        num_global = ep_group.size() * self.num_gemms
        offset = ep_group.rank() * self.num_gemms
        ep_axis = len(sharded_offsets)
        out = {}
        for i in range(self.num_gemms):
            global_expert = offset + i
            if singleton_local_shards:
                expert_prefix, offsets = f"{global_expert}.{prefix}", sharded_offsets
            else:
                expert_prefix, offsets = prefix, (*sharded_offsets, (ep_axis, global_expert, num_global))
            sub = make_sharded_tensors_for_checkpoint({f"{i}.weight": getattr(self, f"weight{i}"),
                                                       f"{i}._extra_state": None}, "",
                                                      {f"{i}.weight": self.split_dim}, offsets,
                                                      tp_group=self._tp_group, dp_cp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
            out[f"{prefix}weight{i}"] = sub[f"{i}.weight"]
            out[f"{prefix}_extra_state{'' if i == 0 else i}"] = sub[f"{i}._extra_state"]
        for sharded in out.values():
            # replicated over expert data parallelism, not (like dense weights) data parallelism
            sharded.replica_id = (*sharded.replica_id[:2], self._pg_collection.expt_dp.rank())
        return out


def _drop_per_gemm_extra_states(state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix + "_extra_state") and k != prefix + "_extra_state"]:
        del state_dict[key]


class ColumnGroupedLinear(GroupedLinear):
    """fc1 of the experts: output rows split over expert tensor parallelism."""

    split_dim = 0


class RowGroupedLinear(GroupedLinear):
    """fc2 of the experts: input columns split over expert tensor parallelism."""

    split_dim = 1


def _param_device(config):
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def grouped_experts_spec():
    """The experts spec of a grouped-GEMM MoE layer without Transformer Engine."""
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=TEGroupedMLP,
                      submodules=MLPSubmodules(linear_fc1=ColumnGroupedLinear, linear_fc2=RowGroupedLinear))


def use_grouped_experts(block_spec) -> None:
    """Put :func:`grouped_experts_spec` into every MoE layer of a decoder block spec built by
    megatron's local provider (which would otherwise choose its legacy ``GroupedMLP``)."""
    for layer in block_spec.layer_specs:
        mlp = layer.submodules.mlp
        experts = getattr(getattr(mlp, "submodules", None), "experts", None)
        if experts is not None:
            mlp.submodules.experts = grouped_experts_spec()
