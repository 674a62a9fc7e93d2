"""A failure mid-run becomes one line: the step, the cause, the checkpoint kept, how to resume."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Callable, Optional


class StepFailed(RuntimeError):
    """A step failed mid-run (the rollout engine, a save on a full disk, ...): the message is one
    line naming the step, the cause, the newest checkpoint kept and how to resume; the traceback is
    in the run directory's error.log."""


def step_failure(err: BaseException, step: int, run_dir: Path, data_state: Optional[dict],
                 rank0: bool) -> StepFailed:
    """The StepFailed for `err` at `step` (rank 0 appends the traceback to run_dir/error.log)."""
    log_path = run_dir / "error.log"
    if rank0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as f:
                f.write(f"step {step}:\n{''.join(traceback.format_exception(err))}\n")
        except OSError:
            pass
    cause = " ".join(f"{type(err).__name__}: {err}".split())[:400]
    kept = (f"the newest checkpoint is step {data_state['step']}" if data_state
            else "no checkpoint was saved yet")
    return StepFailed(f"step {step} failed ({cause}); {kept}: resume with `r1mega train --resume {run_dir}` "
                      f"(traceback in {log_path})")


@contextlib.contextmanager
def reported_as_step_failure(where: Callable[[], tuple[int, Optional[dict]]], run_dir: Path, rank0: bool):
    """Any failure inside becomes :class:`StepFailed`; `where()` gives (the step, the saved state)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure mid-run: say what was kept and what to do
        step, data_state = where()
        raise step_failure(err, step, run_dir, data_state, rank0) from err


__all__ = ["StepFailed", "reported_as_step_failure", "step_failure"]
