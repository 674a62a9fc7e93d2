"""The phases of one GRPO step, each a function with a contract, called in order by
:func:`r1mega.trainer.loop.train`. Each is collective (every rank calls it) unless it says so.

    collect_groups    prompts -> G completions each (engines) -> rewards (rank 0), refilled by
                      dynamic sampling                                          -> Scored
    make_train_batch  overlong handling, group advantages, the padded rows       -> TrainBatch
    fill_logprobs     the sampling policy's log-probs (recomputed, or the engine's) and the reference's
    train_minibatches one Policy.train_step per mini-batch on the run's LossSpec -> their metrics
    move_reference    grpo.ref_update_interval: the reference becomes the policy
    evaluate_heldout  the held-out prompts by R1's protocol, through r1mega eval's evaluator
    save              the checkpoint and the loop's own state (sampler, evaluations, phase times)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.evaluation import SUMMARY_KEYS, EvalSettings, evaluate_prompts, stop_token_ids
from r1mega.parallel.collectives import everyone, from_rank0, share
from r1mega.rollout import SamplingParams, sampling_params
from r1mega.templates import render_prompts
from r1mega.trainer import steps as S
from r1mega.trainer.setup import GRPORun
from r1mega.trainer.timer import PhaseTimer

SEED_STRIDE = 1_000_003  # a step's sampling seeds are seed + step * SEED_STRIDE + refill round


@dataclass
class Scored:
    """A step's rollout with its rewards, every group informative under dynamic sampling."""

    rollout: S.Rollout
    rewards: S.Rewards
    generated: int  # completions generated, refills included
    kept_groups: int
    rounds: int


def generate_completions(run: GRPORun, prompt_ids: list[list[int]], params: SamplingParams, *,
                         first_prompt_index: int = 0) -> list:
    """Each engine rank generates its share of the prompts (seeded by their global index,
    `first_prompt_index` + row); every rank gets all the completions, in prompt-major order."""
    mine = []
    if run.engine is not None:
        a, b = share(len(prompt_ids), len(run.engines), run.engines.index(dist.get_rank()))
        if b > a:
            mine = run.engine.generate(prompt_ids[a:b], params, first_prompt_index=first_prompt_index + a)
    return sorted((c for part in everyone(mine) for c in part), key=lambda c: (c.prompt_index, c.sample_index))


def generate(run: GRPORun, records: list, prompt_ids: list[list[int]], params: SamplingParams) -> S.Rollout:
    """The rollout of `records` (every rank gets all of it)."""
    return S.make_rollout(records, prompt_ids, generate_completions(run, prompt_ids, params), run.tokenizer)


def collect_groups(run: GRPORun, step: int, timer: PhaseTimer) -> Scored:
    """G completions of batch.prompts_per_step prompts, scored (laps "rollout" and "reward").
    With grpo.dynamic_sampling, groups whose rewards are all equal are dropped and fresh prompts
    sampled, up to grpo.max_resample_rounds more rounds, and the kept groups cut to
    prompts_per_step. An empty rollout when no group is left (the step trains nothing)."""
    cfg, grpo, tok = run.cfg, run.cfg.grpo, run.tokenizer
    wanted = cfg.batch.prompts_per_step
    params = sampling_params(cfg.rollout, n=grpo.group_size, seed=cfg.run.seed + step * SEED_STRIDE,
                             stop_token_ids=(tok.eos_token_id,) if tok.eos_token_id is not None else ())
    parts, kept_groups, rounds, generated = [], 0, 0, 0
    while True:
        records = next(run.sampler)
        prompt_ids = render_prompts(records, tok, cfg.run.template, cfg.rollout.max_prompt_tokens)
        part = generate(run, records, prompt_ids, dataclasses.replace(params, seed=params.seed + rounds))
        generated += len(part)
        timer.lap("rollout")
        rewards = from_rank0(S.score(run.scorer, part) if run.rank0 else None)
        timer.lap("reward")
        if grpo.dynamic_sampling:
            keep = set(S.informative_groups(rewards.total, part.group))
            rows = [i for i, g in enumerate(part.group) if g in keep]
            parts.append((part.select(rows), rewards.select(rows)))
            kept_groups += len(keep)
        else:
            parts.append((part, rewards))
            kept_groups += len(set(part.group))
        rounds += 1
        if not grpo.dynamic_sampling or kept_groups >= wanted or rounds > grpo.max_resample_rounds:
            break
    rollout, rewards = S.Rollout.concat([p for p, _ in parts]), S.Rewards.concat([r for _, r in parts])
    if grpo.dynamic_sampling and len(rollout) and kept_groups > wanted:
        rows = [i for i, g in enumerate(rollout.group) if g < wanted]
        rollout, rewards = rollout.select(rows), rewards.select(rows)
    return Scored(rollout, rewards, generated, kept_groups, rounds)


def make_train_batch(scored: Scored, run: GRPORun) -> S.TrainBatch:
    """The step's rows: grpo.overlong's soft penalty (added to the rewards) or mask (truncated
    completions leave the loss), then the group advantages; old/ref log-probs still unset."""
    grpo, rollout = run.cfg.grpo, scored.rollout
    lengths = torch.tensor([len(c) for c in rollout.completions])
    truncated = torch.tensor([c.finish_reason == "length" for c in rollout.completions])
    total, loss_mask = scored.rewards.total.clone(), None
    if grpo.overlong == "soft":
        total = total + S.overlong_penalty(lengths, truncated, max_new_tokens=run.cfg.rollout.max_new_tokens,
                                           buffer=grpo.overlong_buffer)
    elif grpo.overlong == "mask":
        loss_mask = ~truncated
    return S.build_batch(rollout, S.advantages(total, rollout.group, grpo), loss_mask=loss_mask, pad_id=run.pad_id)


def fill_logprobs(run: GRPORun, batch: S.TrainBatch) -> None:
    """batch.old_logp: the policy's recomputed log-probs (grpo.old_logp=recompute, with the
    recorded routes under router replay) or the engine's own; batch.ref_logp: the reference's."""
    batch_cfg = run.cfg.batch
    budget, balance = batch_cfg.micro_batch_tokens, batch_cfg.balance
    if run.cfg.grpo.old_logp == "rollout":
        batch.old_logp = batch.rollout_logp
    else:
        routes = batch.routes if run.cfg.rollout.router_replay else None
        batch.old_logp = run.policy.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                             routes=routes, balance=balance)
    if run.reference is not None:
        batch.ref_logp = run.reference.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                                balance=balance)


def train_minibatches(run: GRPORun, batch: S.TrainBatch) -> list[dict]:
    """One optimizer step per mini-batch (batch.minibatches_per_step; the policy spreads each
    over data-parallel ranks with global denominators); their metrics."""
    cfg = run.cfg
    return [run.policy.train_step(mb.train_tensors(tis=cfg.grpo.tis, replay=cfg.rollout.router_replay),
                                  run.loss_spec, micro_batch_tokens=cfg.batch.micro_batch_tokens,
                                  balance=cfg.batch.balance)
            for mb in S.minibatches(batch, cfg.batch.minibatches_per_step)]


def move_reference(run: GRPORun, step: int) -> None:
    """After step `step`, the reference takes the policy's weights every grpo.ref_update_interval steps."""
    interval = run.cfg.grpo.ref_update_interval
    if run.reference is not None and interval and (step + 1) % interval == 0:
        run.reference.model.load_state_dict(run.policy.model.state_dict())


def evaluate_heldout(run: GRPORun) -> dict[str, float]:
    """The held-out prompts by R1's protocol (the eval section), through the evaluator of
    ``r1mega eval`` (r1mega.evaluation.evaluate_prompts) on the run's engines: pass@1, cons@k,
    greedy accuracy, format and language rates, response length; the same dict on every rank."""
    settings = EvalSettings.from_config(run.cfg)
    records = run.inputs.heldout
    prompt_ids = render_prompts(records, run.tokenizer, settings.template, settings.max_prompt_tokens)
    result = evaluate_prompts(functools.partial(generate_completions, run), run.eval_scorer, records, prompt_ids,
                              settings, stop_token_ids(run.tokenizer))
    summary = None
    if result is not None:
        s = result["summary"]
        # NaN (a figure no problem had, e.g. language_rate where no prompt names a language) is None:
        # the results go into the checkpoint's JSON data_state
        summary = {**{k: None if math.isnan(s[k]) else s[k] for k in SUMMARY_KEYS}, "prompts": s["problems"],
                   "samples_per_prompt": s["samples"], "seconds": s["seconds"]}
    return from_rank0(summary)


def run_heldout_eval(run: GRPORun, step: int) -> None:
    """The held-out evaluation at `step`, once per step (a resumed run keeps its earlier results)."""
    if run.inputs.heldout and str(step) not in run.evals:
        result = evaluate_heldout(run)
        run.evals[str(step)] = result
        run.log.evaluation(step, result)
        shown = {k: "n/a" if result[k] is None else f"{result[k]:.3f}" for k in ("pass_at_1", "format_rate")}
        run.log.note(f"held-out pass@1 at step {step}: {shown['pass_at_1']} (format {shown['format_rate']}, "
                     f"{len(run.inputs.heldout)} prompts x {run.cfg.eval.samples})")


def save(run: GRPORun, step: int) -> None:
    """A checkpoint after step `step` with the loop's state (sampler, evaluations, phase seconds,
    the moved reference's directory)."""
    ref_dir = save_reference(run.reference, run.run_dir, step + 1, run.cfg.grpo.ref_update_interval)
    state = {"step": step + 1, "sampler": run.sampler.state_dict(), "evals": run.evals,
             "phase_seconds": run.phase_seconds,
             "reference": str(ref_dir) if ref_dir else (run.data_state or {}).get("reference")}
    run.policy.save_checkpoint(run.run_dir / "checkpoints", data_state=state, keep_last=run.cfg.run.keep_checkpoints)
    run.data_state = state


def save_reference(reference, run_dir: Path, step: int, interval: int) -> Optional[Path]:
    """The reference policy's weights when it has moved (grpo.ref_update_interval), as a HF dir."""
    if reference is None or not interval or step < interval:
        return None
    moved_at = step - step % interval
    out = run_dir / "reference" / f"step_{moved_at}"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    reference.export_hf(tmp)
    if dist.get_rank() == 0:
        os.replace(tmp, out)
    dist.barrier()
    return out


__all__ = ["SEED_STRIDE", "Scored", "collect_groups", "evaluate_heldout", "fill_logprobs", "generate",
           "make_train_batch", "move_reference", "run_heldout_eval", "save", "save_reference", "train_minibatches"]
