"""``r1mega plot``: a run's curves.png, GRPO's or SFT's panels (an SFT run logs no reward)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from r1mega.run.logs import METRICS, plot_run, read_jsonl
from r1mega.run.panels import panels_for


def plot_command(cfg, *, run: str | Path, out: Optional[str | Path] = None) -> int:
    """Draw the run directory `run`'s curves into `out` (default RUN/curves.png); prints the path.
    The config holds no plot settings: the run's metrics say which panels."""
    print(plot_run(run, out, panels=panels_for(read_jsonl(Path(run) / METRICS))))
    return 0


__all__ = ["plot_command"]
