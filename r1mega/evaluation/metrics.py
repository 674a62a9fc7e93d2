"""Evaluation metrics of sampled completions: pass@k, cons@k (majority vote), and their means.

Pure functions of per-sample outcomes; no model, no config. The DeepSeek-R1 protocol reports
pass@1 as the mean accuracy of k samples per problem at temperature 0.6, top-p 0.95, and cons@k as
the accuracy of the majority answer of the k samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from `n` samples of which `c` are correct (Chen et al.,
    2021): 1 - C(n - c, k) / C(n, k). pass@1 is c / n. Needs 0 <= c <= n and 1 <= k <= n."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(answers: Sequence[Optional[str]], same: Callable[[str, str], bool]) -> Optional[int]:
    """Index of a sample whose answer is the most frequent, answers being grouped by `same`
    (an equivalence, e.g. math-verify's); None when no sample has an answer. Samples without an
    answer (None) do not vote. Ties go to the group whose first member comes first."""
    groups: list[list[int]] = []  # indices, the first is the group's representative
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if answer == answers[group[0]] or same(answer, answers[group[0]]):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equal lengths
    return best[0]


def cons_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], same: Callable[[str, str], bool]) -> float:
    """1.0 if the majority answer of the samples is correct, else 0.0 (no answer at all: 0.0).
    `answers[i]` is sample i's extracted final answer (None: none), `correct[i]` its accuracy."""
    if len(answers) != len(correct):
        raise ValueError(f"cons_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    i = majority_index(answers, same)
    return float(i is not None and bool(correct[i]))


def mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The mean of a[i] - b[i] over paired scores (two models' per-problem pass@1 on the same
    problems) and its standard error: the sample standard deviation of the differences (n - 1 in
    the denominator) over sqrt(n). Pairing removes the problems' own difficulty from the error,
    which two independent standard errors would count twice. NaN pairs are left out; the error is
    NaN with fewer than two pairs left."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} scores against {len(b)}")
    diffs = [x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    if not diffs:
        return math.nan, math.nan
    gap = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return gap, math.nan
    var = sum((d - gap) ** 2 for d in diffs) / (len(diffs) - 1)
    return gap, math.sqrt(var / len(diffs))


__all__ = ["cons_at_k", "majority_index", "mean", "paired_difference", "pass_at_k"]
