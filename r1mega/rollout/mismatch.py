"""How far the rollout engine's log-probs are from the trainer's, per step.

The engine samples with its own kernels (bf16 or FP8 on GPU, other reduction orders, another
MoE routing), so its log-prob of a token differs from the trainer's recomputation of it. The
trainer logs these every step (slime and NeMo-RL gate CI on the same figures):

* ``mismatch_abs_mean`` / ``mismatch_abs_max``: |rollout - trainer| over response tokens;
* ``mismatch_k3``: the k3 estimate of KL(rollout || trainer) from the rollout's own samples,
  mean over tokens of exp(d) - d - 1 with d = trainer - rollout (>= 0, 0 iff equal);
* ``tis_capped_frac``: the share of tokens whose truncated-importance-sampling weight
  exp(trainer - rollout) exceeds the cap (those tokens' updates are cut back).

For data parallelism, :func:`mismatch_sums` gives the additive parts (all-reduce them with SUM,
the max with MAX) and :func:`finish_mismatch` turns them into the metrics.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

KEYS = ("mismatch_abs_mean", "mismatch_abs_max", "mismatch_k3", "tis_capped_frac", "mismatch_tokens")


def mismatch_sums(rollout_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor, *,
                  tis_cap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [4]: sum |d|, sum k3, capped tokens, tokens; float64 scalar: max |d|) over mask."""
    if rollout_logp.shape != trainer_logp.shape or mask.shape != rollout_logp.shape:
        raise ValueError(f"mismatch: rollout_logp {tuple(rollout_logp.shape)}, trainer_logp "
                         f"{tuple(trainer_logp.shape)} and mask {tuple(mask.shape)} must have one shape")
    if tis_cap is not None and not (isinstance(tis_cap, (int, float)) and tis_cap > 0):
        raise ValueError(f"mismatch: tis_cap must be a number > 0 or None, got {tis_cap!r}")
    m = mask.bool()
    d = (trainer_logp.double() - rollout_logp.double())[m]
    k3 = torch.expm1(d) - d
    capped = (d > math.log(tis_cap)).sum() if tis_cap is not None else torch.zeros((), dtype=torch.long)
    sums = torch.stack([d.abs().sum(), k3.sum(), capped.double(), torch.tensor(float(d.numel()), dtype=torch.float64)])
    peak = d.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64)
    return sums, peak


def finish_mismatch(sums: torch.Tensor, peak: torch.Tensor) -> dict[str, float]:
    n = float(sums[3])
    per = 1.0 / n if n else 0.0
    return {"mismatch_abs_mean": float(sums[0]) * per, "mismatch_abs_max": float(peak),
            "mismatch_k3": float(sums[1]) * per, "tis_capped_frac": float(sums[2]) * per, "mismatch_tokens": n}


def mismatch_metrics(rollout_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor, *,
                     tis_cap: Optional[float] = None) -> dict[str, float]:
    """The module docstring's metrics over the tokens where `mask` is set (all [S, T])."""
    return finish_mismatch(*mismatch_sums(rollout_logp, trainer_logp, mask, tis_cap=tis_cap))
