"""The phases of one GRPO step, each a function with a contract (the loop in r1mega.trainer.loop
calls them in order). Pure where it can be: the tensor work takes tensors and config sections.

    records -> prompt_token_ids (template) -> Rollout (engine.generate) -> rewards (reward pool)
    -> advantages (+ dynamic sampling, overlong handling) -> TrainBatch -> mini-batches
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from r1mega.algo import grpo_advantages
from r1mega.config import GRPOConfig
from r1mega.data.records import PromptRecord
from r1mega.rollout import Completion


# ---- rollouts -----------------------------------------------------------------------------------
@dataclass
class Rollout:
    """The completions of one step: row s belongs to prompt group[s] (rows of a group adjacent)."""

    records: list[PromptRecord]  # one per row (the prompt's record)
    prompt_ids: list[list[int]]  # one per row
    completions: list[Completion]
    texts: list[str]
    group: list[int]

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: Sequence[int]) -> "Rollout":
        return Rollout([self.records[i] for i in rows], [self.prompt_ids[i] for i in rows],
                       [self.completions[i] for i in rows], [self.texts[i] for i in rows],
                       [self.group[i] for i in rows])

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        out = Rollout([], [], [], [], [])
        offset = 0
        for part in parts:
            out.records += part.records
            out.prompt_ids += part.prompt_ids
            out.completions += part.completions
            out.texts += part.texts
            out.group += [g + offset for g in part.group]
            offset += (max(part.group) + 1) if part.group else 0
        return out


def make_rollout(records: Sequence[PromptRecord], prompt_ids: Sequence[Sequence[int]], completions: Sequence[Completion],
                 tokenizer) -> Rollout:
    """Rows in the engine's prompt-major order; texts decoded without special tokens."""
    rows = [c.prompt_index for c in completions]
    texts = [tokenizer.decode(c.token_ids.tolist(), skip_special_tokens=True) for c in completions]
    return Rollout([records[i] for i in rows], [list(prompt_ids[i]) for i in rows], list(completions), texts, rows)


# ---- rewards ------------------------------------------------------------------------------------
@dataclass
class Rewards:
    """total: [S] float64, NaN where no reward could be computed (a failure, not a zero);
    values: {reward name: [S] values, NaN where skipped or failed}; errors: failures by name."""

    total: torch.Tensor
    values: dict[str, torch.Tensor]
    errors: dict[str, int] = field(default_factory=dict)

    def select(self, rows: Sequence[int]) -> "Rewards":
        """The rows `rows` (the failure counts stay the whole batch's)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return Rewards(self.total[idx], {k: v[idx] for k, v in self.values.items()}, dict(self.errors))

    @staticmethod
    def concat(parts: Sequence["Rewards"]) -> "Rewards":
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p.errors.items():
                errors[k] = errors.get(k, 0) + v
        return Rewards(torch.cat([p.total for p in parts]), {k: torch.cat([p.values[k] for p in parts])
                                                            for k in parts[0].values}, errors)


def score(pool, rollout: Rollout) -> Rewards:
    """The reward pool's scores; a sample any of whose rewards failed (raised, crashed, timed out)
    is left out (NaN), so it neither counts as wrong nor moves its group's statistics."""
    scored = pool.score(rollout.records, rollout.texts)
    names = list(pool.weights)
    total = torch.tensor([math.nan if s.errors else s.total for s in scored], dtype=torch.float64)
    values = {n: torch.tensor([math.nan if s.values.get(n) is None or n in s.errors else s.values[n]
                               for s in scored], dtype=torch.float64) for n in names}
    errors: dict[str, int] = {}
    for s in scored:
        for name in s.errors:
            errors[name] = errors.get(name, 0) + 1
    return Rewards(total, values, errors)


def overlong_penalty(lengths: torch.Tensor, truncated: torch.Tensor, *, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max - buffer tokens, then linear down to -1 at the
    budget; -1 for a truncated completion."""
    start = max_new_tokens - buffer
    penalty = -(lengths.double() - start).clamp(min=0) / buffer
    return torch.where(truncated, torch.full_like(penalty, -1.0), penalty.clamp(min=-1.0))


def advantages(total: torch.Tensor, group: Sequence[int], grpo: GRPOConfig) -> torch.Tensor:
    """Per-row GRPO advantages ([S] float32) with the config's scale and eps; NaN rewards get 0."""
    groups = torch.tensor(list(group))
    return grpo_advantages(total, groups, scale=grpo.adv_scale, eps=grpo.adv_eps).float()


def informative_groups(total: torch.Tensor, group: Sequence[int]) -> list[int]:
    """DAPO dynamic sampling: the groups whose scorable rewards are not all equal."""
    keep = []
    groups = torch.tensor(list(group))
    for g in sorted(set(group)):
        r = total[groups == g]
        r = r[~torch.isnan(r)]
        if r.numel() >= 2 and bool((r != r[0]).any()):
            keep.append(g)
    return keep


# ---- the training batch -------------------------------------------------------------------------
@dataclass
class TrainBatch:
    """Right-padded [S, T] tensors aligned as Policy.train_step wants (logp[s, t] scores ids[s, t])."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    routes: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: Sequence[int]) -> "TrainBatch":
        idx = torch.as_tensor(list(index), dtype=torch.long)
        take = lambda t: None if t is None else t[idx]  # noqa: E731
        return TrainBatch(*(take(getattr(self, f)) for f in ("input_ids", "attention_mask", "completion_mask",
                                                             "rollout_logp", "advantages", "routes", "old_logp",
                                                             "ref_logp")))

    def lengths(self) -> list[int]:
        return self.attention_mask.sum(1).tolist()

    def train_tensors(self, *, tis: bool, replay: bool) -> dict[str, torch.Tensor]:
        """Policy.train_step's batch (tensors only): the engine's log-probs with TIS, the recorded
        routes with router replay, the reference's log-probs when there is a reference."""
        out = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, completion_mask=self.completion_mask,
                   old_logp=self.old_logp, advantages=self.advantages)
        if self.ref_logp is not None:
            out["ref_logp"] = self.ref_logp
        if tis:
            out["rollout_logp"] = self.rollout_logp
        if replay:
            out["routes"] = self.routes
        return out


def build_batch(rollout: Rollout, adv: torch.Tensor, *, loss_mask: Optional[torch.Tensor] = None,
                pad_id: int = 0) -> TrainBatch:
    """Prompt + completion per row, right-padded; the completion mask marks the completion tokens
    (cleared for rows where `loss_mask` is False, e.g. masked overlong completions)."""
    rows = [p + c.token_ids.tolist() for p, c in zip(rollout.prompt_ids, rollout.completions)]
    width = max(map(len, rows))
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    am = torch.zeros(n, width, dtype=torch.bool)
    cm = torch.zeros(n, width, dtype=torch.bool)
    rlp = torch.zeros(n, width, dtype=torch.float32)
    routes = None
    if rollout.completions and rollout.completions[0].routes is not None:
        routes = torch.zeros(n, width, *rollout.completions[0].routes.shape[1:], dtype=torch.int16)
    for s, (p, c, seq) in enumerate(zip(rollout.prompt_ids, rollout.completions, rows)):
        ids[s, :len(seq)] = torch.tensor(seq)
        am[s, :len(seq)] = True
        if loss_mask is None or bool(loss_mask[s]):
            cm[s, len(p):len(seq)] = True
        rlp[s, len(p):len(seq)] = c.logprobs
        if routes is not None:
            routes[s, :len(seq)] = c.routes
    return TrainBatch(ids, am, cm, rlp, adv.float(), routes)


def minibatches(batch: TrainBatch, count: int) -> list[TrainBatch]:
    """`count` mini-batches of consecutive row blocks (whole groups stay together when the rows
    divide evenly). Spreading each over data-parallel ranks is the policy's job (batch.balance)."""
    n = len(batch)
    if count > n:
        raise ValueError(f"batch.minibatches_per_step {count} > the {n} rows of the step")
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [batch.rows(list(range(a, b))) for a, b in zip(bounds, bounds[1:])]

