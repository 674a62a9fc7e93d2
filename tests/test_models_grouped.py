"""Grouped-GEMM experts (policy.grouped_gemm): megatron's TEGroupedMLP layout, with r1mega's torch
grouped linears where Transformer Engine is absent, against transformers' logits and the source
checkpoint's bytes, in TP1, EP2, TP2 with expert TP2, and PP2 (torchrun on gloo); checkpoints
move between the grouped and the per-expert layout."""

import re

import pytest

from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world, layouts", [(1, {"qwen3_moe tp1", "deepseek_v3 tp1"}),
                                            (2, {"qwen3_moe ep2", "deepseek_v3 ep2", "qwen3_moe tp2-etp2",
                                                 "deepseek_v3 pp2"})])
def test_grouped_experts_match_transformers_and_export_bitwise(tiny_models, world, layouts):
    out = run_torchrun("models_grouped.py", world, str(tiny_models))
    found = {f"{name} {tag}": float(diff)
             for name, tag, diff in re.findall(r"^grouped (\S+) (\S+) max_abs_diff (\S+)$", out, re.M)}
    assert set(found) == layouts, out
    assert all(diff <= 2e-5 for diff in found.values()), out
    for layout in layouts:
        assert f"roundtrip grouped {layout} ok" in out, out
    # checkpoints: grouped <-> per-expert modules, both ways, in every layout
    for name in {layout.split()[0] for layout in layouts}:
        for direction in ("grouped->sequential", "sequential->grouped"):
            assert f"checkpoint {name} {direction} ok" in out, out
