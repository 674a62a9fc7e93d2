"""The GRPO run's curves: the panels of ``curves.png`` (r1mega.run.logs.plot_run draws them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from r1mega.run.logs import plot_run

GRPO_PANELS = (("reward_mean", "reward"), ("accuracy", "train accuracy"), ("format_rate", "format rate"),
               ("response_length_mean", "response length"), ("kl_mean", "KL to reference"),
               ("mismatch_abs_mean", "rollout vs trainer |dlogp|"))


def plot_grpo_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """plot_run with the GRPO panels: reward, accuracy, format, length, KL, mismatch."""
    return plot_run(run_dir, out, panels=GRPO_PANELS)
