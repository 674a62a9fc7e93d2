"""What a GRPO step and run report: the step's metrics row, its sample rows, the run's summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from r1mega.rollout import mismatch_metrics
from r1mega.trainer.steps import Rewards, Rollout, TrainBatch

# Train-step metrics averaged over the step's mini-batches (ratio_max: their maximum).
MEAN_TRAIN_METRICS = ("loss", "grad_norm", "lr", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean",
                      "approx_kl", "kl_mean", "tis_weight_mean")


def nanmean(t: Optional[torch.Tensor]) -> float:
    """The mean of the values that are not NaN (NaN when none, or no tensor)."""
    if t is None:
        return math.nan
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


def step_metrics(rewards: Rewards, rollout: Rollout, batch: TrainBatch, train_metrics: list[dict],
                 generated: int, kept_groups: int, seconds: dict[str, float], *,
                 mismatch_tis_cap: Optional[float], recomputed: bool) -> dict[str, float]:
    """metrics.jsonl's row of one step: rewards (scored share, each reward), response lengths and
    truncation, dynamic-sampling counts, the policy's entropy estimate, the train steps' loss
    metrics, rollout tokens/s, the phases' seconds and, when the old log-probs were `recomputed`
    by the policy, the rollout-vs-trainer mismatch (else no trainer log-probs of the rollouts
    exist before the update)."""
    lengths = torch.tensor([len(c) for c in rollout.completions])
    truncated = torch.tensor([c.finish_reason == "length" for c in rollout.completions])
    m: dict[str, float] = {"reward_mean": nanmean(rewards.total),
                           "reward_scored_frac": float((~torch.isnan(rewards.total)).double().mean())}
    for name, values in rewards.values.items():
        m[f"reward_{name}"] = nanmean(values)
    m["accuracy"] = m.get("reward_accuracy", math.nan)
    m["format_rate"] = next((v for k, v in m.items() if k.startswith("reward_format")), math.nan)
    m.update(response_length_mean=float(lengths.double().mean()), response_length_max=float(lengths.max()),
             truncation_rate=float(truncated.double().mean()), sequences=float(len(rollout)),
             groups=float(len(set(rollout.group))), dynamic_groups_kept=float(kept_groups),
             reward_errors=float(sum(rewards.errors.values())))
    cm = batch.completion_mask
    m["entropy_estimate"] = float(-(batch.old_logp[cm]).double().mean()) if cm.any() else math.nan
    for key in MEAN_TRAIN_METRICS:
        vals = [tm[key] for tm in train_metrics if key in tm]
        if vals:
            m[key] = sum(vals) / len(vals)
    m["ratio_max"] = max(tm["ratio_max"] for tm in train_metrics)
    m["optimizer_steps"] = train_metrics[-1]["step"]
    rollout_s = seconds.get("time_rollout", 0.0)
    m["rollout_tokens_per_s"] = generated and sum(len(c) for c in rollout.completions) / max(rollout_s, 1e-9)
    m.update(seconds)
    m["seconds"] = sum(seconds.values())
    if recomputed:
        m.update(mismatch_metrics(batch.rollout_logp, batch.old_logp, batch.completion_mask & batch.attention_mask,
                                  tis_cap=mismatch_tis_cap))
    return m


def sample_rows(rollout: Rollout, rewards: Rewards, advantages: torch.Tensor, count: int) -> list[dict]:
    """samples.jsonl's rows of one step: the first `count` completions with reward and advantage."""
    def num(x) -> Optional[float]:
        x = float(x)
        return None if math.isnan(x) else x

    return [{"prompt": r.prompt, "completion": text, "reward": num(rewards.total[i]), "advantage": float(advantages[i]),
             "finish_reason": rollout.completions[i].finish_reason}
            for i, (r, text) in enumerate(zip(rollout.records, rollout.texts)) if i < count]


def run_summary(*, base_model: Path, final_model: Path, heldout_file: Optional[Path], evals: dict, steps: int,
                wall_s: float, inputs_s: float, phase_seconds: dict[str, float]) -> dict:
    """summary.json: held-out pass@1 and format before and after, the final response length, time."""
    before, after = evals.get("0", {}), evals.get(str(steps), {})
    return {
        "base_model": str(base_model.resolve()), "final_model": str(final_model.resolve()),
        "heldout_file": str(heldout_file.resolve()) if heldout_file else None,
        "heldout_accuracy_before": before.get("pass_at_1"), "heldout_accuracy_after": after.get("pass_at_1"),
        "format_rate_before": before.get("format_rate"), "format_rate_after": after.get("format_rate"),
        "response_length_after": after.get("response_length_mean"), "steps": steps,
        "wall_s": wall_s, "inputs_s": inputs_s, "phase_seconds": phase_seconds,
    }


def summary_text(s: dict) -> str:
    """The summary as the line the run ends with."""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    phases = ", ".join(f"{k[5:]} {v:.0f}s" for k, v in sorted(s["phase_seconds"].items()))
    return (f"held-out pass@1 {fmt(s['heldout_accuracy_before'])} -> {fmt(s['heldout_accuracy_after'])}, "
            f"format {fmt(s['format_rate_before'])} -> {fmt(s['format_rate_after'])}, "
            f"response length {fmt(s['response_length_after'])}; {s['steps']} steps in "
            f"{s['wall_s'] - s['inputs_s']:.0f}s ({phases})"
            + (f", after {s['inputs_s']:.0f}s of setup (the base model built)" if s["inputs_s"] >= 10 else "")
            + f"; final model: {s['final_model']}")


__all__ = ["MEAN_TRAIN_METRICS", "nanmean", "run_summary", "sample_rows", "step_metrics", "summary_text"]
