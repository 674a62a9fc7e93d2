"""``r1mega plot``: a run's curves.png, GRPO's or SFT's panels (an SFT run logs no reward).

Beside the CLI, above both trainers: it picks the GRPO trainer's panels or SFT's, which r1mega.run
(below them) cannot import."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from r1mega.run.logs import METRICS, plot_run, read_jsonl
from r1mega.sft.loop import SFT_PANELS
from r1mega.trainer.panels import GRPO_PANELS


def plot_command(cfg, *, run: str | Path, out: Optional[str | Path] = None) -> int:
    """Draw the run directory `run`'s curves into `out` (default RUN/curves.png); prints the path.
    The config holds no plot settings: the run's metrics say which panels."""
    grpo = any("reward_mean" in m for m in read_jsonl(Path(run) / METRICS))
    print(plot_run(run, out, panels=GRPO_PANELS if grpo else SFT_PANELS))
    return 0


__all__ = ["plot_command"]
