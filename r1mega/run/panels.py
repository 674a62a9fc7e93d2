"""The panels of a run's ``curves.png``, per kind of run: (metric key, title), at most 6 each.

The trainers draw theirs at the end of a run (:func:`r1mega.run.logs.plot_run`); ``r1mega plot``
picks them by what the run's metrics hold (an SFT run logs no reward)."""

from __future__ import annotations

GRPO_PANELS = (("reward_mean", "reward"), ("accuracy", "train accuracy"), ("format_rate", "format rate"),
               ("response_length_mean", "response length"), ("kl_mean", "KL to reference"),
               ("mismatch_abs_mean", "rollout vs trainer |dlogp|"))
SFT_PANELS = (("loss", "SFT loss (mean NLL of completion tokens)"), ("lr", "learning rate"),
              ("padding_frac", "padding share"), ("tokens_per_s", "trained tokens / s"),
              ("rows", "packed rows per step"), ("examples", "examples per step"))


def panels_for(metrics: list[dict]) -> tuple:
    """GRPO's panels for a run whose metrics.jsonl rows have a reward, else SFT's."""
    return GRPO_PANELS if any("reward_mean" in m for m in metrics) else SFT_PANELS


__all__ = ["GRPO_PANELS", "SFT_PANELS", "panels_for"]
