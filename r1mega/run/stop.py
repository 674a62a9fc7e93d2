"""Stopping a run cleanly on SIGTERM (a pre-empted node, ``scancel``, ``kubectl delete``).

The first SIGTERM asks the run to stop: the step in progress finishes, a checkpoint is saved and
the process exits 0; ``r1mega train --resume RUN`` then continues as if nothing happened. A
second SIGTERM ends the process at once (the default action), for a job that must go now.
Ranks decide together (:meth:`GracefulStop.agreed`), so a signal that reaches the ranks of a
distributed run at different moments stops all of them after the same step.
"""

from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    """Installs the SIGTERM handler while in use (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second one: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
            return
        self.requested = True
        sys.stderr.write("\nr1mega: SIGTERM: finishing this step, then saving a checkpoint and exiting "
                         "(a second SIGTERM stops at once)\n")
        sys.stderr.flush()

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flags = [False] * dist.get_world_size()
        dist.all_gather_object(flags, self.requested)
        return any(flags)
