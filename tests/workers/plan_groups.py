"""Worker: the dry-run plan (r1mega.launch_plan) equals what the real run builds, on every rank.

For each layout, on the world torchrun gave: init_parallel (megatron's initialize_model_parallel),
then this rank's coordinates (current_layout), the ranks of each of its process groups, the engine
ranks the trainer chooses (r1mega.parallel.collectives.engine_ranks) and, where a model is named, the
global layer numbers and the expert indices of the GPTModel build_model makes on this rank, each
compared with the plan's entry for this rank. Rank 0 prints "ok <layout>" per layout.

argv: LAYOUT... each ``name:key=value,key=value`` (ParallelConfig fields) or
``name:key=value,...@MODEL_DIR`` to also build the model.
"""

import sys

from _models_common import log, quiet_megatron


def parse(spec: str):
    name, _, rest = spec.partition(":")
    fields, _, model = rest.partition("@")
    kwargs = {}
    for item in filter(None, fields.split(",")):
        key, value = item.split("=")
        kwargs[key] = int(value)
    return name, kwargs, model or None


def model_parts(model):
    """(first, last + 1) of the global layer indices this rank built, and the local experts of its
    MoE layers (one tuple per MoE layer)."""
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers]  # megatron's are 1-based
    experts = [tuple(layer.mlp.local_expert_indices) for layer in model.decoder.layers
               if hasattr(layer.mlp, "local_expert_indices")]
    return (min(numbers), max(numbers) + 1), numbers, experts


def main() -> None:
    quiet_megatron()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from r1mega.models import build_model, describe_hf_model
    from r1mega.parallel import ParallelConfig, current_layout, destroy_parallel, init_parallel
    from r1mega.launch_plan import make_plan
    from r1mega.parallel.collectives import engine_ranks

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {"tp": ps.get_tensor_model_parallel_group, "pp": ps.get_pipeline_model_parallel_group,
              "dp": ps.get_data_parallel_group, "ep": ps.get_expert_model_parallel_group,
              "etp": ps.get_expert_tensor_parallel_group, "expert_dp": ps.get_expert_data_parallel_group}
    for spec in sys.argv[1:]:
        name, kwargs, model_dir = parse(spec)
        parallel = ParallelConfig(**kwargs)
        desc = describe_hf_model(model_dir) if model_dir else None
        plan = make_plan(parallel, 1, world, desc=desc)
        mine = plan.ranks[rank]
        layout = init_parallel(parallel)
        real = {"tp": layout.tp_rank, "pp": layout.pp_rank, "dp": layout.dp_rank, "ep": layout.ep_rank,
                "etp": layout.etp_rank, "expert_dp": layout.expert_dp_rank}
        assert real == mine.coords, (name, rank, real, mine.coords)
        real_groups = {kind: tuple(dist.get_process_group_ranks(get())) for kind, get in groups.items()}
        assert real_groups == mine.groups, (name, rank, real_groups, mine.groups)
        sizes = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep, "etp": layout.etp,
                 "expert_dp": layout.expert_dp}
        assert sizes == plan.sizes, (name, sizes, plan.sizes)
        assert engine_ranks(layout) == plan.engines, (name, engine_ranks(layout), plan.engines)
        if desc is not None:
            span, numbers, experts = model_parts(build_model(desc, parallel))
            assert span == mine.layers and numbers == list(range(*span)), (name, rank, numbers, mine.layers)
            assert experts, (name, "no MoE layer on this rank: nothing to compare")
            assert all(e == tuple(range(*mine.experts)) for e in experts), (name, rank, experts, mine.experts)
        if rank == 0:
            log(f"ok {name}")
        destroy_parallel()
    destroy_parallel(process_group=True)


if __name__ == "__main__":
    main()
