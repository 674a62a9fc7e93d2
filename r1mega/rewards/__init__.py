"""Rewards: rule-based verifiers (math accuracy, format, language consistency, countdown), their
weighted sum, a process pool that runs them under deadlines, and a learned reward model.

Everything here is light to import except :class:`RewardModel` (torch and transformers), which
is imported on first use so reward worker processes never load it.
"""

from __future__ import annotations

from r1mega.rewards.accuracy import (
    GoldAnswerError,
    equivalent_answers,
    extract_final_answer,
    last_boxed,
    math_accuracy,
    math_accuracy_detailed,
    parse_gold,
)
from r1mega.rewards.base import RewardFn, RewardOutput
from r1mega.rewards.composite import CompositeReward, ScoredSample, weighted_total
from r1mega.rewards.countdown import countdown_reward, countdown_reward_detailed, evaluate_expression
from r1mega.rewards.format import format_reward, format_reward_detailed
from r1mega.rewards.language import language_consistency, language_consistency_detailed
from r1mega.rewards.pool import RewardPool, pool_kwargs
from r1mega.rewards.registry import REWARDS, get_reward, load_reward, register_reward

__all__ = [
    "REWARDS", "CompositeReward", "GoldAnswerError", "RewardFn", "RewardModel", "RewardOutput",
    "RewardPool", "ScoredSample", "countdown_reward", "countdown_reward_detailed", "equivalent_answers",
    "evaluate_expression", "extract_final_answer", "format_reward", "format_reward_detailed",
    "get_reward", "language_consistency", "language_consistency_detailed", "last_boxed", "load_reward",
    "math_accuracy", "math_accuracy_detailed", "parse_gold", "pool_kwargs", "register_reward", "weighted_total",
]


def __getattr__(name: str):
    if name == "RewardModel":
        from r1mega.rewards.reward_model import RewardModel

        return RewardModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
