"""The tiny recipes reproduce tests/golden/metrics.json bit for bit (see tests/golden_metrics.py)."""

from __future__ import annotations

import json
import math

from tests.golden_metrics import GOLDEN, collect


def _differences(expected, got, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: missing" for k in expected if k not in got]
        out += [f"{where}.{k}: new" for k in got if k not in expected]
        for k in expected.keys() & got.keys():
            out += _differences(expected[k], got[k], f"{where}.{k}")
        return out
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f"{where}: {len(expected)} rows expected, {len(got)} got"]
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in _differences(e, g, f"{where}[{i}]")]
    same = expected == got or (isinstance(expected, float) and isinstance(got, float)
                               and math.isnan(expected) and math.isnan(got))
    return [] if same else [f"{where}: {expected!r} expected, {got!r} got"]


def test_golden_metrics_reproduced_bit_for_bit(tmp_path, small_base_model):
    golden = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(collect(tmp_path, base=small_base_model)))  # through JSON, as the golden file was written
    diffs = _differences(golden["runs"], got, "runs")
    assert not diffs, ("numerics moved from tests/golden/metrics.json (" + golden["reason"] + "); first of "
                       f"{len(diffs)}:\n" + "\n".join(diffs[:15]) + "\nif they should, regenerate it in a commit of "
                       'its own: python -m tests.golden_metrics --reason "..."')


def test_differences_names_the_place():
    golden = {"grpo": {"metrics": [{"loss": 0.5, "kl": float("nan")}]}}
    assert _differences(golden, {"grpo": {"metrics": [{"loss": 0.5, "kl": float("nan")}]}}) == []
    assert _differences(golden, {"grpo": {"metrics": [{"loss": 0.5000001, "kl": float("nan")}]}}) == \
        [".grpo.metrics[0].loss: 0.5 expected, 0.5000001 got"]
    assert _differences(golden, {"grpo": {"metrics": []}}) == [".grpo.metrics: 1 rows expected, 0 got"]
