"""The tiny recipes reproduce tests/golden/metrics.json bit for bit (see tests/golden_metrics.py)."""

from __future__ import annotations

import json
import math

import pytest

from tests.golden_metrics import collect, entry_for, load, weights_hash


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
    base = weights_hash(small_base_model)
    golden = entry_for(load(), base)
    if golden is None:
        recorded = ", ".join(f"{e['runs']['base']} ({e['environment'].get('cpu_model', e['environment']['machine'])})"
                             for e in load()["machines"])
        pytest.skip(f"no golden metrics for this machine's kernels (its test base is {base}; recorded: {recorded}); "
                    "record them with python -m tests.golden_metrics --reason '...'")
    names = tuple(k for k in golden["runs"] if k != "base")
    got = json.loads(json.dumps(collect(tmp_path, names, base=small_base_model)))  # through JSON, as the file was written
    diffs = _differences(golden["runs"], got, "runs")
    assert not diffs, ("numerics moved from tests/golden/metrics.json (" + golden["reason"] + "); first of "
                       f"{len(diffs)}:\n" + "\n".join(diffs[:15]) + "\nif they should, regenerate it in a commit of "
                       'its own: python -m tests.golden_metrics --reason "..."')


def test_each_machine_entry_is_found_by_its_test_base_hash():
    doc = {"machines": [{"runs": {"base": "aa", "x": 1}}, {"runs": {"base": "bb", "x": 2}}]}
    assert entry_for(doc, "bb")["runs"]["x"] == 2 and entry_for(doc, "cc") is None
    assert load()["machines"] and all(e["runs"].get("base") for e in load()["machines"])


def test_differences_names_the_place():
    golden = {"grpo": {"metrics": [{"loss": 0.5, "kl": float("nan")}]}}
    assert _differences(golden, {"grpo": {"metrics": [{"loss": 0.5, "kl": float("nan")}]}}) == []
    assert _differences(golden, {"grpo": {"metrics": [{"loss": 0.5000001, "kl": float("nan")}]}}) == \
        [".grpo.metrics[0].loss: 0.5 expected, 0.5000001 got"]
    assert _differences(golden, {"grpo": {"metrics": []}}) == [".grpo.metrics: 1 rows expected, 0 got"]
