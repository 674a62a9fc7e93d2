"""Worker (2 ranks): TP2, EP2 (alltoall and allgather), PP2 give transformers' logits, and each
layout exports the source checkpoint back bit for bit; a layout that does not fit the world size
is refused before any work.

argv: ROOT — fixture directories from tests.models_fixtures.build_fixture_set.
"""

import sys
from pathlib import Path

from _models_common import check_layout, log, quiet_megatron

LAYOUTS = [  # (fixture, ParallelConfig kwargs)
    ("qwen3_moe", dict(tp=2)),  # MoE + TP: sequence parallel on
    ("qwen3_moe", dict(ep=2, moe_dispatcher="alltoall")),
    ("qwen3_moe", dict(ep=2, moe_dispatcher="allgather")),
    ("deepseek_v3", dict(tp=2)),
    ("deepseek_v3", dict(ep=2)),
    ("deepseek_v3", dict(pp=2, pp_first_stage_layers=1)),  # 3 layers: 1 + 2
    ("qwen2", dict(tp=2)),
    ("qwen2", dict(pp=2)),  # tied embeddings across stages
    ("llama", dict(tp=2)),
]


def main() -> None:
    quiet_megatron()
    from r1mega.config import ConfigError
    from r1mega.models import build_model, describe_hf_model
    from r1mega.parallel import ParallelConfig, destroy_parallel, init_parallel

    root = Path(sys.argv[1])
    try:
        init_parallel(ParallelConfig(tp=4))
    except ConfigError as err:
        assert "world size 2" in str(err) and "tp*pp" in str(err), err
        log(f"refused: {err}")
    else:
        raise AssertionError("tp=4 on 2 ranks was not refused")

    for name, kwargs in LAYOUTS:
        parallel = ParallelConfig(**kwargs)
        tag = "-".join(f"{k}{v}" if isinstance(v, int) else v for k, v in kwargs.items()
                       if k != "pp_first_stage_layers")
        layout = init_parallel(parallel)
        desc = describe_hf_model(root / name)
        model = build_model(desc, parallel)
        check_layout(model, desc, root, name, tag, layout, root / f"roundtrip-{name}-{tag}", "layout")
        del model
    destroy_parallel(process_group=True)


if __name__ == "__main__":
    main()
