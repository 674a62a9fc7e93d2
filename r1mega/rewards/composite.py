"""The weighted sum of named rewards, as DeepSeek-R1 sums accuracy, format and language
consistency.

``weights`` ({reward name: weight}) decides which rewards run: every named reward is computed
for every sample and kept per name for the metrics; the total is sum(weight * value) over the
rewards that apply (a skipped reward adds nothing). A reward that raises scores 0 and its error
is recorded; it never raises out of the composite.

:class:`CompositeReward` runs in the calling process with no time bound: use it for tests,
debugging and evaluation of trusted rewards. Training uses :class:`~r1mega.rewards.pool.
RewardPool`, which computes the same :class:`ScoredSample` in worker processes under deadlines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1mega.data.records import PromptRecord
from r1mega.rewards.base import RewardFn, RewardOutput
from r1mega.rewards.registry import check_weights, get_reward


@dataclass
class ScoredSample:
    """The rewards of one completion.

    total: sum of weight * value over the rewards that were not skipped (errors count as 0).
    values: {name: value} for every weighted reward; None where the reward was skipped; 0.0
        where it failed.
    errors: {name: message} for the rewards that raised, crashed their worker or timed out.
    info: {name: the reward's diagnostics dict}.
    timeouts: names of the rewards that ran out of time (also listed in ``errors``).
    """

    total: float
    values: dict[str, float | None]
    errors: dict[str, str] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeouts: tuple[str, ...] = ()


def weighted_total(weights: Mapping[str, float], values: Mapping[str, float | None]) -> float:
    """sum(weights[name] * values[name]) over the names whose value is not None."""
    total = math.fsum(weights[name] * value for name, value in values.items() if value is not None)
    return total


def error_message(exc: BaseException) -> str:
    """One line for an exception, cut to 500 characters."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text[:500]


def call_reward(fn: RewardFn, record: PromptRecord, completion: str, options: Mapping[str, Any]
                ) -> RewardOutput:
    """``fn(record, completion, **options)``, checked to return a RewardOutput."""
    out = fn(record, completion, **options)
    if not isinstance(out, RewardOutput):
        raise TypeError(f"reward returned {type(out).__name__}, not a RewardOutput")
    return out


def check_options(options: Mapping[str, Mapping[str, Any]] | None, weights: Mapping[str, float]
                  ) -> dict[str, dict[str, Any]]:
    """``options`` ({reward name: keyword arguments}) checked against the weighted names."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must be a mapping {{reward name: {{keyword: value}}}}, got {options!r}")
    out = {}
    for name, kwargs in options.items():
        if name not in weights:
            raise ValueError(f"options[{name!r}] is given but {name!r} is not in weights "
                             f"({', '.join(weights)})")
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"options[{name!r}] must be a mapping of keyword arguments, got {kwargs!r}")
        out[name] = dict(kwargs)
    return out


class CompositeReward:
    """The weighted sum of named rewards, computed in this process.

    Args:
        weights: {reward name: weight}; names from the registry (r1mega.rewards.registry.REWARDS)
            or ``rewards``. Weight 0 computes and reports a reward without adding it.
        rewards: extra {name: fn} rewards, looked up before the registry.
        options: {reward name: keyword arguments passed to that reward}, e.g.
            ``{"accuracy": {"math_timeout_s": 3}}``.
    """

    def __init__(self, weights: Mapping[str, float], *, rewards: Mapping[str, RewardFn] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.weights = check_weights(weights, rewards)
        self.fns = {name: get_reward(name, rewards) for name in self.weights}
        self.options = check_options(options, self.weights)

    def __call__(self, record: PromptRecord, completion: str) -> ScoredSample:
        values: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, fn in self.fns.items():
            try:
                out = call_reward(fn, record, completion, self.options.get(name, {}))
            except Exception as e:  # a failing reward scores 0; the composite never raises
                values[name], errors[name] = 0.0, error_message(e)
                continue
            values[name] = None if out.skipped else out.value
            info[name] = out.info
        return ScoredSample(weighted_total(self.weights, values), values, errors, info)

    def score(self, records: Sequence[PromptRecord], completions: Sequence[str]) -> list[ScoredSample]:
        """One ScoredSample per (record, completion) pair, in order."""
        if len(records) != len(completions):
            raise ValueError(f"records and completions must have the same length, got "
                             f"{len(records)} and {len(completions)}")
        return [self(r, c) for r, c in zip(records, completions)]
