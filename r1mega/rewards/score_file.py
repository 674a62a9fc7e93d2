"""``r1mega reward``: score a file of completions with the trainer's reward path (the rewards
section's pool) and print a summary per reward."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from r1mega.data import DataError, load_completions, load_prompts
from r1mega.rewards import GoldAnswerError, RewardPool, parse_gold, pool_kwargs
from r1mega.utils.io import atomic_write_text


def reward_command(cfg, *, data: str | Path, completions: str | Path, out: Optional[str | Path] = None) -> int:
    """Score `completions` (rows {"id", "completion"}) of the prompts in `data` with the pool
    ``cfg.rewards`` describes; write one JSON line per completion to `out` when given."""
    pairs = load_completions(completions, load_prompts(data))
    for record in {record.id: record for record, _ in pairs}.values():
        if record.task == "math":  # refuse a gold answer that could never score, before any work
            try:
                parse_gold(record.answer)
            except GoldAnswerError as err:
                raise DataError(f"{data}: id {record.id!r}: field 'answer': {err}") from None
    kwargs = pool_kwargs(cfg.rewards)
    weights = kwargs.pop("weights")
    start = time.perf_counter()
    with RewardPool(weights, **kwargs) as pool:
        scored = pool.score([record for record, _ in pairs], [text for _, text in pairs])
        stats = pool.summary()
    seconds = time.perf_counter() - start
    if out:
        atomic_write_text(out, "".join(
            json.dumps({"id": record.id, "total": s.total, "values": s.values, "errors": s.errors})
            + "\n" for (record, _), s in zip(pairs, scored)))
    print(f"{'reward':<16}{'weight':>7}{'mean':>9}{'count':>7}{'skipped':>8}{'errors':>7}"
          f"{'timeouts':>9}{'seconds':>9}")
    for name, s in stats.items():
        print(f"{name:<16}{weights[name]:>7g}{s['mean']:>9.4f}{s['count']:>7d}{s['skipped']:>8d}"
              f"{s['errors']:>7d}{s['timeouts']:>9d}{s['seconds']:>9.2f}")
    total_mean = sum(s.total for s in scored) / len(scored)
    print(f"total mean {total_mean:.4f} over {len(scored)} completions in {seconds:.2f} s "
          f"({len(scored) / seconds:.1f} completions/s)")
    return 0


__all__ = ["reward_command"]
