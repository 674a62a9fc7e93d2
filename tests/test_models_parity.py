"""megatron models built from Hugging Face configs reproduce transformers' logits, in every layout,
and export their weights back bit for bit (torchrun on gloo, tiny fp32 models from
tests.models_fixtures).
"""

import re

import pytest

from tests.models_fixtures import BF16, FIXTURES
from tests.torchrun import run_torchrun

pytestmark = pytest.mark.distributed


def test_tp1_logits_match_transformers_and_round_trip_is_bitwise(tiny_models):
    """Every family (and DeepSeek-V3 with q LoRA + YaRN, and in bf16 with an fp32 expert bias)."""
    out = run_torchrun("models_parity.py", 1, str(tiny_models), BF16, *FIXTURES)
    assert "patches cpu,local-spec" in out, out
    assert f"roundtrip {BF16} source-dtypes ok" in out and f"roundtrip {BF16} default-dtypes ok" in out, out
    for name in FIXTURES:
        diff = re.search(rf"^parity {name} max_abs_diff (\S+)$", out, re.M)
        assert diff and float(diff.group(1)) <= 2e-5, out
        assert f"roundtrip {name} ok" in out, out


def test_tp2_ep2_pp2_logits_match_and_export_bitwise(tiny_models):
    out = run_torchrun("models_layouts.py", 2, str(tiny_models))
    assert "refused: parallel: world size 2 is not a multiple of tp*pp" in out, out
    layouts = re.findall(r"^layout (\S+) (\S+) max_abs_diff (\S+)$", out, re.M)
    assert len(layouts) == 9, out
    assert all(float(diff) <= 2e-5 for _, _, diff in layouts), out
    assert len(re.findall(r"^roundtrip .* ok", out, re.M)) == 9, out
    assert "roundtrip layout deepseek_v3 ep2 ok files=2" in out  # each EP rank writes its own experts
