"""Rewards routed by task, as DeepSeek-R1's last RL stage scores its mixed prompts: rule rewards
for what a rule verifies (math, code, Countdown), a learned reward model for "general" prompts.

:class:`RoutedRewards` has the reward pool's interface (``weights``, ``score``, ``close``): the
pool scores every sample (accuracy is skipped on general records, format and language apply to
all), then the reward model scores the general ones, and ``weight * score`` is added to their
total under the name ``"reward_model"`` (None on the other records). A reward model that raises
marks its samples failed (left out of the loss, like any failed reward), never zero.
"""

from __future__ import annotations

from collections.abc import Sequence

from r1mega.data.records import PromptRecord
from r1mega.rewards.composite import ScoredSample, error_message

GENERAL = "general"
NAME = "reward_model"


class RoutedRewards:
    """A reward pool plus a reward model for the records of task "general".

    Args:
        pool: a :class:`~r1mega.rewards.pool.RewardPool` (or anything with ``weights`` and
            ``score(records, completions) -> list[ScoredSample]``) whose accuracy reward skips
            general records (``options={"accuracy": {"skip_general": True}}``).
        reward_model: an object with ``score(prompts, completions) -> list[float]``, e.g.
            :class:`~r1mega.rewards.reward_model.RewardModel`; it sees ``record.prompt`` (the
            question, not the rendered template) and the completion.
        weight: the reward model's weight in the total.
    """

    def __init__(self, pool, reward_model, weight: float = 1.0) -> None:
        if NAME in pool.weights:
            raise ValueError(f"the pool already has a reward named {NAME!r}")
        self.pool, self.reward_model, self.weight = pool, reward_model, float(weight)
        self.weights = {**pool.weights, NAME: self.weight}

    def score(self, records: Sequence[PromptRecord], completions: Sequence[str]) -> list[ScoredSample]:
        scored = self.pool.score(records, completions)
        rows = [i for i, r in enumerate(records) if r.task == GENERAL]
        for s in scored:
            s.values[NAME] = None
        if not rows:
            return scored
        try:
            values = self.reward_model.score([records[i].prompt for i in rows], [completions[i] for i in rows])
        except Exception as e:  # the reward model's failure is these samples' failure, not a zero
            for i in rows:
                scored[i].values[NAME], scored[i].errors[NAME] = 0.0, error_message(e)
            return scored
        for i, value in zip(rows, values):
            scored[i].values[NAME] = float(value)
            scored[i].total += self.weight * float(value)
        return scored

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "RoutedRewards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
