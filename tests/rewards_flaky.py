"""A user reward (``rewards.custom``) that misbehaves on purpose, for the trainer's reward-failure
test: on about a quarter of the samples it kills its worker process, on another quarter it hangs
past the pool's deadline; otherwise it scores 0.0. Which samples is fixed by a hash of the prompt
id and completion, so the run is deterministic."""

from __future__ import annotations

import os
import time
import zlib

from r1mega.rewards import RewardOutput


def crash_or_hang(record, completion: str) -> RewardOutput:
    kind = zlib.crc32(f"{record.id}\0{completion}".encode()) % 4
    if kind == 0:
        os._exit(13)  # a segfault-like death: no exception, no reply
    if kind == 1:
        time.sleep(3600)
    return RewardOutput(0.0, {"kind": kind})
