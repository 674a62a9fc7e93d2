"""The breakdowns an evaluation preset reports beside its means (``r1mega eval --benchmark``;
the presets themselves, R1's protocol per benchmark, are r1mega.recipes.BENCHMARKS)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from r1mega.evaluation.metrics import mean


def breakdowns(records: Sequence[Any], problems: Sequence[dict], fields: Sequence[str]) -> dict[str, dict]:
    """{field: {value: {"problems", "pass_at_1", "cons_at_k"}}} over the records whose meta has
    `field` (problems[i] is the evaluated row of records[i]); groups in sorted order."""
    out: dict[str, dict] = {}
    for field in fields:
        groups: dict[str, list[dict]] = defaultdict(list)
        for record, problem in zip(records, problems):
            if field in record.meta:
                groups[str(record.meta[field])].append(problem)
        if groups:
            out[field] = {value: {"problems": len(rows), "pass_at_1": mean([r["pass_at_1"] for r in rows]),
                                  "cons_at_k": mean([r["cons_at_k"] for r in rows])}
                          for value, rows in sorted(groups.items())}
    return out


def breakdown_table(breakdown: dict[str, dict]) -> str:
    """The breakdowns as text lines: one line per group."""
    lines = []
    for field, groups in breakdown.items():
        width = max(len(v) for v in groups)
        lines.append(f"by {field}:")
        lines += [f"  {value:<{width}}  {g['problems']:>4} problems  pass@1 {g['pass_at_1']:.3f}  cons@k "
                  f"{g['cons_at_k']:.3f}" for value, g in groups.items()]
    return "\n".join(lines)


__all__ = ["breakdown_table", "breakdowns"]
