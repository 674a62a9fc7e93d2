"""Worker (1 rank): each fixture model loaded into megatron at TP1 gives transformers' logits, and
HF -> megatron -> HF is bit-identical per tensor; a bf16 checkpoint with an fp32 expert bias keeps
both dtypes through the round trip; on CPU the whole shim is applied.

argv: ROOT BF16_NAME NAME... — fixture directories ROOT/NAME with ROOT/NAME.ref.pt (from
tests.models_fixtures.build_fixture_set). Prints one line per check for the test to read.
"""

import sys
from pathlib import Path

from _models_common import LOGIT_ATOL, log, quiet_megatron, reference, same_tensors


def main() -> None:
    quiet_megatron()
    import torch

    from r1mega.models import (
        build_model,
        describe_hf_model,
        export_hf_weights,
        forward_logits,
        load_hf_weights,
    )
    from r1mega.parallel import ParallelConfig, destroy_parallel, init_parallel
    from r1mega.megatron_compat import applied_patches

    root, bf16, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    parallel = ParallelConfig()
    init_parallel(parallel)
    if not torch.cuda.is_available():
        assert applied_patches() == ["cpu", "local-spec"], applied_patches()
    log(f"patches {','.join(applied_patches())}")
    for name in names:
        desc = describe_hf_model(root / name)
        model = build_model(desc, parallel)
        report = load_hf_weights(model, desc, root / name)
        ref = reference(root, name)
        logits = forward_logits(model, ref["ids"])
        diff = (logits - ref["logits"]).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{name}: max |logits - transformers| = {diff:.3g} > {LOGIT_ATOL}"
        log(f"parity {name} max_abs_diff {diff:.3g}")
        out = root / f"roundtrip-{name}-tp1"
        export_hf_weights(model, desc, out, dtypes=report.dtypes,
                          config_json=(root / name / "config.json").read_text())
        problems = same_tensors(root / name, out)
        assert not problems, f"{name}: round trip differs: {problems[:5]}"
        log(f"roundtrip {name} ok")

    desc = describe_hf_model(root / bf16)
    model = build_model(desc, parallel)
    report = load_hf_weights(model, desc, root / bf16)
    dtypes = {p.dtype for n, p in model.state_dict().items() if isinstance(p, torch.Tensor) and "expert_bias" not in n}
    assert dtypes == {torch.bfloat16}, dtypes
    assert model.decoder.layers[1].mlp.router.expert_bias.dtype == torch.float32
    for how, kwargs in (("source-dtypes", {"dtypes": report.dtypes}), ("default-dtypes", {})):
        out = root / f"roundtrip-{bf16}-{how}"
        export_hf_weights(model, desc, out, **kwargs)
        problems = same_tensors(root / bf16, out)
        assert not problems, f"{bf16} ({how}): round trip differs: {problems[:5]}"
        log(f"roundtrip {bf16} {how} ok")
    destroy_parallel(process_group=True)


if __name__ == "__main__":
    main()
