"""The step's phase clock: each lap adds the time since the previous one to a named phase."""

from __future__ import annotations

import time


class PhaseTimer:
    """``lap("rollout")`` charges the seconds since the last lap (or the start) to ``time_rollout``;
    a phase lapped twice in a step (a dynamic-sampling refill) adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        key = f"time_{phase}"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self._clock
        self._clock = now


__all__ = ["PhaseTimer"]
