"""Worker (1 or 2 ranks): grouped-GEMM experts (``policy.grouped_gemm``: megatron's TEGroupedMLP
layout, ``mlp.experts.linear_fc{1,2}.weight{j}``) load a Hugging Face checkpoint, give transformers'
logits, and export it back bit for bit, in every layout the world size allows; a checkpoint
written in the grouped layout loads into per-expert modules and the other way round.

argv: ROOT — fixture directories from tests.models_fixtures.build_fixture_set.
"""

import sys
from pathlib import Path

from _models_common import check_layout, log, quiet_megatron

LAYOUTS = {  # world size -> (fixture, ParallelConfig kwargs)
    1: [("qwen3_moe", {}), ("deepseek_v3", {})],
    2: [("qwen3_moe", dict(ep=2)), ("deepseek_v3", dict(ep=2)),
        ("qwen3_moe", dict(tp=2, etp=2)),  # each expert's FFN split over two ranks
        ("deepseek_v3", dict(pp=2, pp_first_stage_layers=1))],
}


def main() -> None:
    quiet_megatron()
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from r1mega.config import PolicyConfig
    from r1mega.models import build_model, describe_hf_model
    from r1mega.parallel import ParallelConfig, destroy_parallel, init_parallel

    root = Path(sys.argv[1])
    grouped = PolicyConfig(grouped_gemm=True)
    world = None
    for name, kwargs in LAYOUTS[int(__import__("os").environ["WORLD_SIZE"])]:
        parallel = ParallelConfig(**kwargs)
        tag = "-".join(f"{k}{v}" for k, v in kwargs.items() if k != "pp_first_stage_layers") or "tp1"
        layout = init_parallel(parallel)
        world = layout.world
        desc = describe_hf_model(root / name)
        model = build_model(desc, parallel, policy=grouped)
        experts = [m for m in model.modules() if isinstance(m, TEGroupedMLP)]
        names = [n for n, _ in model.named_parameters() if ".mlp.experts." in n]
        assert all(".experts.linear_fc" in n for n in names), names[:4]
        built = torch.tensor(len(experts))
        dist.all_reduce(built)  # a pipeline stage may hold only dense layers
        assert built > 0, f"{name} {tag}: no grouped experts built"
        if layout.rank == 0:
            log(f"grouped {name} {tag} local_experts {experts[0].num_local_experts if experts else 0}")
        check_layout(model, desc, root, name, tag, layout, root / f"roundtrip-grouped-{name}-{tag}-w{world}", "grouped")
        del model
        check_checkpoint_across_expert_layouts(root / name, root / f"ckpt-grouped-{name}-{tag}-w{world}", parallel)
    destroy_parallel(process_group=True)


def check_checkpoint_across_expert_layouts(model_dir: Path, out: Path, parallel) -> None:
    """A checkpoint written with grouped experts loads into per-expert modules and one written
    with per-expert modules into grouped experts (the same sharded keys), to the same log-probs."""
    import torch

    from r1mega.algo import LossSpec
    from r1mega.config import PolicyConfig
    from r1mega.models import load_policy

    grouped, sequential = PolicyConfig(grouped_gemm=True), PolicyConfig()
    ids = torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    for name, save_as, load_as in (("grouped->sequential", grouped, sequential),
                                   ("sequential->grouped", sequential, grouped)):
        policy = load_policy(model_dir, parallel=parallel, policy=save_as)
        cm = torch.ones_like(ids, dtype=torch.bool)
        cm[:, :4] = False
        policy.train_step(dict(input_ids=ids, attention_mask=torch.ones_like(cm), completion_mask=cm,
                               old_logp=policy.logprobs(ids), advantages=torch.tensor([1.0, -0.5, -0.5])),
                          LossSpec())
        before = policy.logprobs(ids)  # after a step: the optimizer state exists and is saved too
        step_dir = policy.save_checkpoint(out / name)
        del policy
        loaded = load_policy(step_dir, parallel=parallel, policy=load_as)
        diff = (loaded.logprobs(ids) - before).abs().max().item()
        assert diff == 0.0, f"{model_dir.name} {name}: log-probs moved by {diff:.3g} through the checkpoint"
        del loaded
        if parallel_rank() == 0:
            log(f"checkpoint {model_dir.name} {name} ok")


def parallel_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


if __name__ == "__main__":
    main()
