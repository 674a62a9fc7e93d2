"""The pipeline's claims over several bases: statistics against numpy's, claims counted per base."""

from __future__ import annotations

import math

import numpy as np
import pytest

from r1mega import pipeline as P
from r1mega.pipeline_bases import FIGURES, aggregate, bases_table, spread


def manifest(seed: int, *, failing: tuple[str, ...] = ()) -> dict:
    rng = np.random.default_rng(seed)
    table = {label: {k: float(rng.uniform(0, 1)) for k in FIGURES} for label, *_ in P.ROWS}
    checks = {claim: claim not in failing for claim in CLAIMS}
    return {"table": table, "checks": checks,
            "stages": {"reward_model": {"figures": {"heldout_accuracy": float(rng.uniform(0.5, 1))}}}}


CLAIMS = ("cold start raises format validity over the base", "the student beats its own base")


def test_each_figure_is_the_mean_and_spread_over_the_bases_and_each_claim_counts_its_bases():
    manifests = {"s0t2": manifest(0), "s0t1": manifest(1, failing=(CLAIMS[1],)), "s1t2": manifest(2),
                 "s2t1": manifest(3, failing=(CLAIMS[1],))}
    agg = aggregate(manifests)
    assert agg["bases"] == ["s0t2", "s0t1", "s1t2", "s2t1"]
    for label, *_ in P.ROWS:
        for k in FIGURES:
            values = np.array([m["table"][label][k] for m in manifests.values()])
            s = agg["rows"][label][k]
            assert s["n"] == 4 and s["min"] == values.min() and s["max"] == values.max()
            assert math.isclose(s["mean"], values.mean(), rel_tol=1e-12)
            assert math.isclose(s["std"], values.std(ddof=1), rel_tol=1e-12)
    assert agg["claims"][CLAIMS[0]] == {"held": 4, "of": 4, "failed_on": []}
    assert agg["claims"][CLAIMS[1]] == {"held": 2, "of": 4, "failed_on": ["s0t1", "s2t1"]}
    text = bases_table(agg)
    assert f"[yes] 4/4 {CLAIMS[0]}" in text and f"[NO ] 2/4 {CLAIMS[1]} (fails on s0t1, s2t1)" in text
    assert text.splitlines()[0] == "4 base models: s0t2, s0t1, s1t2, s2t1"


def test_missing_figures_are_left_out_and_an_unfinished_run_is_refused():
    assert spread([0.5, math.nan, None]) == {"n": 1, "mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}
    assert spread([math.nan])["n"] == 0
    with pytest.raises(ValueError, match="s1t1: the pipeline run has no table yet"):
        aggregate({"s0t2": manifest(0), "s1t1": {"stages": {}}})
