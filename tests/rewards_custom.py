"""User rewards (``rewards.custom``) for the trainer tests.

* ``digit_share``: a dense, deterministic reward (the share of digits in the completion), so that a
  barely pretrained base model's groups have unequal rewards and the first step's loss and
  gradients are not zero: the layout tests then compare something.
* ``judge_has_digit``: a judge for `r1mega sample --judge` (yes when the completion has a digit).
* ``killed_once_digit_share``: digit_share whose worker is killed once in the run, mid-batch.
* ``crash_or_hang``: misbehaves on purpose. On about a quarter of the samples it kills its worker
  process, on another quarter it hangs past the pool's deadline; otherwise it scores 0.0. Which
  samples is fixed by a hash of the prompt id and completion, so the run is deterministic.
"""

from __future__ import annotations

import os
import time
import zlib

from r1mega.rewards import RewardOutput


def digit_share(record, completion: str) -> RewardOutput:
    return RewardOutput(sum(c.isdigit() for c in completion) / max(len(completion), 1))


def killed_once_digit_share(record, completion: str) -> RewardOutput:
    """digit_share, but the first call in a run (a marker file in $R1MEGA_TEST_MARKER_DIR) has its
    worker process SIGKILLed mid-batch, as the OOM killer would."""
    marker = os.path.join(os.environ["R1MEGA_TEST_MARKER_DIR"], "killed")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), 9)
    return digit_share(record, completion)


def crash_or_hang(record, completion: str) -> RewardOutput:
    kind = zlib.crc32(f"{record.id}\0{completion}".encode()) % 4
    if kind == 0:
        os._exit(13)  # a segfault-like death: no exception, no reply
    if kind == 1:
        time.sleep(3600)
    return RewardOutput(0.0, {"kind": kind})


def judge_has_digit(record, completion: str) -> bool:
    """A stand-in judge for prompts no rule verifies (r1mega sample --judge): yes when the
    completion contains a digit."""
    return any(c.isdigit() for c in completion)
