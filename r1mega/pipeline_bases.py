"""The R1 pipeline's claims over several base models: each stage's held-out figures as mean and
spread, and each claim as held on k of N bases.

One ``r1mega pipeline`` run shows what its base model allows; a base pretrained with another seed
or thread count is just as good a starting point, and the recipe's stages must hold on it too.
:func:`aggregate` reads the manifests (``OUT/manifest.json``) of pipeline runs that differ only in
their base and :func:`bases_table` prints what they show together
(``benchmarks/bench_pipeline_bases.py`` runs them).
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping

from r1mega.pipeline import ROWS

FIGURES = ("pass_at_1", "greedy_accuracy", "format_rate", "mixing_rate")
HEADS = {"pass_at_1": "pass@1", "greedy_accuracy": "greedy", "format_rate": "format", "mixing_rate": "mixing"}


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min and max of the finite `values`."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": len(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "min": min(finite), "max": max(finite)}


def aggregate(manifests: Mapping[str, dict]) -> dict:
    """{"bases": [names], "rows": {table row: {figure: spread}}, "reward_model": spread,
    "claims": {claim: {"held": k, "of": N, "failed_on": [names]}}} over finished pipeline
    manifests keyed by a name of their base. A manifest without its table (a run that did not
    finish) is an error: the claims are over finished runs only."""
    for name, m in manifests.items():
        if "table" not in m or "checks" not in m:
            raise ValueError(f"{name}: the pipeline run has no table yet (run `r1mega pipeline` to the end)")
    names = list(manifests)
    rows = {}
    for label, *_ in ROWS:
        present = [m["table"][label] for m in manifests.values() if label in m["table"]]
        if present:
            rows[label] = {k: spread([f.get(k) for f in present]) for k in FIGURES}
    rm = spread([m["stages"]["reward_model"]["figures"].get("heldout_accuracy") for m in manifests.values()])
    claims: dict[str, dict] = {}
    for name, m in manifests.items():
        for claim, ok in m["checks"].items():
            c = claims.setdefault(claim, {"held": 0, "of": 0, "failed_on": []})
            c["of"] += 1
            c["held"] += bool(ok)
            if not ok:
                c["failed_on"].append(name)
    return {"bases": names, "rows": rows, "reward_model": rm, "claims": claims}


def bases_table(agg: dict) -> str:
    """The aggregate as text: per row, each figure's mean ± std [min, max]; then each claim as k/N."""
    n = len(agg["bases"])
    head = f"{'model':<28}" + "".join(f"{HEADS[k]:>24}" for k in FIGURES)
    lines = [f"{n} base models: {', '.join(agg['bases'])}", "mean ± std [min, max] over the bases", head,
             "-" * len(head)]
    for label, figures in agg["rows"].items():
        cells = []
        for k in FIGURES:
            s = figures[k]
            cells.append("n/a" if not s["n"] else f"{s['mean']:.3f}±{s['std']:.3f} [{s['min']:.2f},{s['max']:.2f}]")
        lines.append(f"{label:<28}" + "".join(f"{c:>24}" for c in cells))
    rm = agg["reward_model"]
    if rm["n"]:
        lines.append(f"reward model held-out pair accuracy: {rm['mean']:.3f}±{rm['std']:.3f} "
                     f"[{rm['min']:.3f}, {rm['max']:.3f}]")
    for claim, c in agg["claims"].items():
        mark = "yes" if c["held"] == c["of"] else "NO "
        failed = f" (fails on {', '.join(c['failed_on'])})" if c["failed_on"] else ""
        lines.append(f"[{mark}] {c['held']}/{c['of']} {claim}{failed}")
    return "\n".join(lines)


__all__ = ["FIGURES", "aggregate", "bases_table", "spread"]
