"""The GRPO loop: ``r1mega train``. Every rank of a torchrun job runs it; rank 0 writes the run.

One step, read top to bottom in :func:`train`:

    refit the engines (colocated order) -> sample prompts -> template -> generate G each
    -> score (reward pool) -> [dynamic sampling: refill groups whose rewards are all equal]
    -> [overlong: mask or soft penalty] -> group advantages -> engines sleep
    -> old log-probs (policy) and reference log-probs -> mini-batches (balanced over DP)
    -> policy.train_step each -> metrics, samples -> checkpoint / eval on their intervals

Engines live on the first rank of each data-parallel replica (tensor and pipeline rank 0) and
get the weights point to point; each generates its replica's share of the prompts (seeded by
the global prompt index, so every layout samples the same completions); every rank then holds
the whole step's rollout and trains on it (the policy splits rows over data parallelism).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.config import Config
from r1mega.trainer import steps as S
from r1mega.trainer.logs import EVAL, METRICS, SAMPLES, RunLog, plot_run, truncate_after
from r1mega.trainer.rundir import export_final, quiet_known_warnings, resolve_model, resume_source
from r1mega.trainer.stop import GracefulStop

SEED_STRIDE = 1_000_003


class StepFailed(RuntimeError):
    """A step failed mid-run (the rollout engine, a save on a full disk, ...): the message is one
    line naming the step, the cause, the newest checkpoint kept and how to resume; the traceback is
    in the run directory's error.log."""


def _step_failure(err: BaseException, step: int, run_dir: Path, data_state: Optional[dict],
                  rank0: bool) -> StepFailed:
    import traceback

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
def _reported_as_step_failure(where, run_dir: Path, rank0: bool):
    """Any failure inside becomes :class:`StepFailed`; `where()` gives (the step, the saved state)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure mid-run: say what was kept and what to do
        step, data_state = where()
        raise _step_failure(err, step, run_dir, data_state, rank0) from err


class TrainError(ValueError):
    """A problem with the run's inputs, found before any work; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Inputs, checked before any work
# ---------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    model_dir: Path  # the policy's source (HF dir or checkpoint)
    hf_dir: Path  # its config and tokenizer
    train: list
    heldout: list
    embedded: bool
    reward_pool_kwargs: dict  # RewardPool's keywords (rewards.custom imported)


def resolve_inputs(cfg: Config) -> Inputs:
    from r1mega.data import DataError, load_prompts
    from r1mega.data import base_corpus

    run = cfg.run
    if run.model is not None and not Path(run.model).is_dir():
        raise TrainError(f"run.model: {run.model!r} is not a directory (a Hugging Face model or an r1mega checkpoint)")
    try:
        train = load_prompts(run.data) if run.data is not None else base_corpus.problems("train", seed=run.seed)
        if run.heldout is not None:
            heldout = load_prompts(run.heldout)
        else:
            heldout = base_corpus.problems("test", seed=run.seed) if run.data is None else []
    except DataError as err:
        raise TrainError(str(err)) from None
    from r1mega.rewards import GoldAnswerError, parse_gold

    for name, records in (("run.data", train), ("run.heldout", heldout)):
        for record in records:
            if record.task == "general" and cfg.rewards.reward_model is None:
                raise TrainError(f"{getattr(run, name.split('.')[1]) or 'the embedded task'}: id {record.id!r}: "
                                 "task 'general' has no rule reward; set rewards.reward_model to a reward model "
                                 "directory (r1mega rm)")
            if record.task == "math":
                try:
                    parse_gold(record.answer)
                except GoldAnswerError as err:
                    raise TrainError(f"{getattr(run, name.split('.')[1]) or 'the embedded task'}: id {record.id!r}: "
                                     f"field 'answer': {err}") from None
    if "accuracy" in cfg.rewards.weights() and any(r.task == "code" for r in (*train, *heldout)):
        from r1mega.rewards.sandbox import SandboxUnavailable, require_backend

        try:
            require_backend()
        except SandboxUnavailable as err:
            raise TrainError(f"{run.data or 'run.data'}: task 'code' records are scored in a sandbox, but {err}") \
                from None
    if cfg.rewards.reward_model is not None and not Path(cfg.rewards.reward_model).is_dir():
        raise TrainError(f"rewards.reward_model: {cfg.rewards.reward_model!r} is not a directory (a Hugging Face "
                         "sequence-classification model, e.g. from r1mega rm)")
    try:
        reward_kwargs = cfg.rewards.pool_kwargs()
    except ValueError as err:
        raise TrainError(str(err)) from None
    longest = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    if cfg.batch.micro_batch_tokens < longest:
        raise TrainError(f"batch.micro_batch_tokens {cfg.batch.micro_batch_tokens} < rollout.max_prompt_tokens + "
                         f"rollout.max_new_tokens = {longest}: a sequence would not fit one micro-batch")
    if len(train) < cfg.batch.prompts_per_step:
        raise TrainError(f"run.data: {len(train)} prompts, fewer than batch.prompts_per_step "
                         f"{cfg.batch.prompts_per_step}")
    model_dir, hf_dir = resolve_model(run.model)
    return Inputs(model_dir, hf_dir, train, heldout[:run.eval_max_prompts], run.model is None, reward_kwargs)


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
def engine_ranks(layout) -> list[int]:
    """The first rank of every data-parallel replica (tensor and pipeline rank 0)."""
    import torch.distributed as dist

    mine = layout.tp_rank == 0 and layout.pp_rank == 0
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (dist.get_rank(), mine))
    return sorted(r for r, is_engine in flags if is_engine)


def share(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of n items split into `parts` near-equal contiguous parts."""
    return round(index * n / parts), round((index + 1) * n / parts)


def everyone(value: Any) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Phases that touch the engines
# ---------------------------------------------------------------------------------------------
def generate(engine, engines: list[int], records: list, prompt_ids: list[list[int]], params, tokenizer) -> S.Rollout:
    """Each engine rank generates its share of the prompts; every rank gets the whole rollout."""
    import torch.distributed as dist

    rank = dist.get_rank()
    mine = []
    if engine is not None:
        a, b = share(len(records), len(engines), engines.index(rank))
        if b > a:
            mine = engine.generate(prompt_ids[a:b], params, first_prompt_index=a)
    completions = sorted((c for part in everyone(mine) for c in part), key=lambda c: (c.prompt_index, c.sample_index))
    return S.make_rollout(records, prompt_ids, completions, tokenizer)


def evaluate(engine, engines, pool, records, tokenizer, cfg: Config, step: int) -> dict[str, float]:
    """pass@1 over k samples per held-out prompt at the evaluation temperature and top-p (R1's
    protocol), with the format rate and the mean response length."""
    from r1mega.rollout import SamplingParams

    run = cfg.run
    params = SamplingParams(n=run.eval_samples, temperature=run.eval_temperature, top_p=run.eval_top_p,
                            max_new_tokens=cfg.rollout.max_new_tokens, seed=run.seed + 7 * SEED_STRIDE)
    prompt_ids = S.render_prompts(records, tokenizer, run.template, cfg.rollout.max_prompt_tokens)
    start = time.perf_counter()
    rollout = generate(engine, engines, records, prompt_ids, params, tokenizer)
    rewards = S.score(pool, rollout) if pool is not None else None
    result = None
    if rewards is not None:
        acc = rewards.values.get("accuracy")
        fmt = next((v for k, v in rewards.values.items() if k.startswith("format")), None)
        result = {"pass_at_1": _nanmean(acc), "format_rate": _nanmean(fmt), "prompts": len(records),
                  "samples_per_prompt": run.eval_samples,
                  "response_length_mean": sum(len(c) for c in rollout.completions) / max(len(rollout), 1),
                  "seconds": time.perf_counter() - start}
    return from_rank0(result)


def _nanmean(t: Optional[torch.Tensor]) -> float:
    if t is None:
        return math.nan
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else math.nan


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train(cfg: Config, *, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Run (or resume) the GRPO job `cfg` describes; returns the summary (also summary.json)."""
    import torch.distributed as dist
    import transformers

    from r1mega.algo import grpo_advantages  # noqa: F401  (fail early if the math is broken)
    from r1mega.data import PromptSampler
    from r1mega.models import load_policy
    from r1mega.rewards import RewardPool
    from r1mega.rollout import Colocation, engine_from_config, mismatch_metrics, sampling_params

    wall = time.perf_counter()
    quiet_known_warnings()
    inputs = resolve_inputs(cfg)
    inputs_s = time.perf_counter() - wall  # reading the data, and building the embedded base model when absent
    run_dir = Path(resume) if resume is not None else cfg.run.run_dir
    try:
        resumed_from = resume_source(run_dir, resuming=resume is not None)
    except ValueError as err:
        raise TrainError(str(err)) from None
    checkpoints = run_dir / "checkpoints"
    source, data_state = resumed_from or inputs.model_dir, None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(inputs.hf_dir))
    grpo, rollout_cfg, batch_cfg = cfg.grpo, cfg.rollout, cfg.batch

    policy = load_policy(source, parallel=cfg.parallel, optim=cfg.optim, temperature=rollout_cfg.temperature,
                         seed=cfg.run.seed, router_replay=rollout_cfg.router_replay, policy=cfg.policy)
    rank0 = dist.get_rank() == 0
    if resumed_from is not None:
        data_state = policy.data_state
    start_step = data_state["step"] if data_state else 0
    reference = None
    if grpo.kl_coef > 0:
        ref_source = Path(data_state["reference"]) if data_state and data_state.get("reference") else inputs.model_dir
        reference = load_policy(ref_source, parallel=cfg.parallel, trainable=False, temperature=rollout_cfg.temperature,
                                seed=cfg.run.seed, load_optimizer=False, policy=cfg.policy)
    engines = engine_ranks(policy.layout)
    engine = (engine_from_config(rollout_cfg, inputs.hf_dir if rollout_cfg.engine == "vllm" else policy.desc.config,
                                 seed=cfg.run.seed, tokenizer=inputs.hf_dir)
              if dist.get_rank() in engines else None)
    colocation = Colocation(policy, engine, rollout_cfg, dst_ranks=engines if rollout_cfg.engine == "hf" else None)
    pool_kwargs = dict(inputs.reward_pool_kwargs)
    pool = RewardPool(pool_kwargs.pop("weights"), **pool_kwargs) if rank0 else None
    if pool is not None and cfg.rewards.reward_model is not None:
        from r1mega.rewards import RewardModel
        from r1mega.rewards.routing import RoutedRewards

        device = "cuda" if torch.cuda.is_available() else "cpu"
        pool = RoutedRewards(pool, RewardModel(cfg.rewards.reward_model, device=device),
                             cfg.rewards.reward_model_weight)
    sampler = PromptSampler(inputs.train, batch_size=batch_cfg.prompts_per_step, seed=cfg.run.seed)
    if data_state:
        sampler.load_state_dict(data_state["sampler"])
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir)
        for name in (METRICS, SAMPLES, EVAL):
            truncate_after(run_dir / name, start_step - 1)
        if inputs.heldout:
            from r1mega.data.loader import write_prompts

            write_prompts(run_dir / "heldout.jsonl", inputs.heldout)
    log = RunLog(run_dir, enabled=rank0, tensorboard=cfg.run.tensorboard,
                 wandb=cfg.run.wandb, config=cfg.to_dict(), total_steps=cfg.run.steps)
    evals = dict(data_state.get("evals", {})) if data_state else {}
    phase_totals: dict[str, float] = dict(data_state.get("phase_seconds", {})) if data_state else {}
    opts = S.loss_options(grpo, rollout_cfg.max_new_tokens, reference is not None)

    def run_eval(step: int) -> None:
        if inputs.heldout and str(step) not in evals:
            result = evaluate(engine, engines, pool, inputs.heldout, tokenizer, cfg, step)
            evals[str(step)] = result
            log.evaluation(step, result)
            log.note(f"held-out pass@1 at step {step}: {result['pass_at_1']:.3f} "
                     f"(format {result['format_rate']:.3f}, {len(inputs.heldout)} prompts x {cfg.run.eval_samples})")

    def save(step: int) -> None:
        nonlocal data_state
        ref_dir = _save_reference(reference, run_dir, step + 1, grpo.ref_update_interval)
        state = {"step": step + 1, "sampler": sampler.state_dict(), "evals": evals, "phase_seconds": phase_totals,
                 "reference": str(ref_dir) if ref_dir else (data_state or {}).get("reference")}
        policy.save_checkpoint(checkpoints, data_state=state, keep_last=cfg.run.keep_checkpoints)
        data_state = state

    def close() -> None:
        log.close()
        if engine is not None:
            engine.close()
        if pool is not None:
            pool.close()

    stopped_after, step = None, start_step
    with GracefulStop() as stop, _reported_as_step_failure(lambda: (step, data_state), run_dir, rank0):
        for step in range(start_step, cfg.run.steps):
            t: dict[str, float] = {}
            clock = time.perf_counter()

            def lap(name):
                nonlocal clock
                now = time.perf_counter()
                t[name] = t.get(name, 0.0) + now - clock
                clock = now

            colocation.refit()
            lap("time_refit")
            if step == 0 or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                run_eval(step)
                lap("time_eval")

            # rollout: G completions of each prompt, refilled by dynamic sampling
            params = sampling_params(rollout_cfg, n=grpo.group_size, seed=cfg.run.seed + step * SEED_STRIDE,
                                     stop_token_ids=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
            parts, kept_groups, rounds, generated = [], 0, 0, 0
            while True:
                records = next(sampler)
                prompt_ids = S.render_prompts(records, tokenizer, cfg.run.template, rollout_cfg.max_prompt_tokens)
                part = generate(engine, engines, records, prompt_ids, dataclasses.replace(params, seed=params.seed + rounds),
                                tokenizer)
                generated += len(part)
                lap("time_rollout")
                rewards = from_rank0(S.score(pool, part) if rank0 else None)
                lap("time_reward")
                if grpo.dynamic_sampling:
                    keep = S.informative_groups(rewards.total, part.group)
                    rows = [i for i, g in enumerate(part.group) if g in set(keep)]
                    parts.append((part.select(rows), _select_rewards(rewards, rows)))
                    kept_groups += len(keep)
                else:
                    parts.append((part, rewards))
                    kept_groups += len(set(part.group))
                rounds += 1
                if not grpo.dynamic_sampling or kept_groups >= batch_cfg.prompts_per_step or rounds > grpo.max_resample_rounds:
                    break
            rollout = S.Rollout.concat([p for p, _ in parts])
            rewards = _concat_rewards([r for _, r in parts])
            if grpo.dynamic_sampling and len(rollout) and kept_groups > batch_cfg.prompts_per_step:
                rows = [i for i, g in enumerate(rollout.group) if g < batch_cfg.prompts_per_step]
                rollout, rewards = rollout.select(rows), _select_rewards(rewards, rows)
            if not len(rollout):
                log.note(f"step {step}: every group had equal rewards after {rounds} rounds; no update")
                log.step(step, {"skipped": 1.0, "dynamic_groups_kept": 0.0})
                continue

            # overlong handling and advantages
            lengths = torch.tensor([len(c) for c in rollout.completions])
            truncated = torch.tensor([c.finish_reason == "length" for c in rollout.completions])
            total, loss_mask = rewards.total.clone(), None
            if grpo.overlong == "soft":
                total = total + S.overlong_penalty(lengths, truncated, max_new_tokens=rollout_cfg.max_new_tokens,
                                                   buffer=grpo.overlong_buffer)
            elif grpo.overlong == "mask":
                loss_mask = ~truncated
            adv = S.advantages(total, rollout.group, grpo)
            batch = S.build_batch(rollout, adv, loss_mask=loss_mask, pad_id=tokenizer.pad_token_id or 0)
            colocation.release()
            lap("time_sleep")

            # log-probs of the sampling policy (recomputed, or the engine's own) and of the reference
            budget = batch_cfg.micro_batch_tokens
            routes = batch.routes if rollout_cfg.router_replay else None
            if grpo.old_logp == "rollout":
                batch.old_logp = batch.rollout_logp
            else:
                batch.old_logp = policy.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                                 routes=routes, balance=batch_cfg.balance)
            if reference is not None:
                batch.ref_logp = reference.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                                    balance=batch_cfg.balance)
            lap("time_logprobs")

            # train: the policy spreads each mini-batch over data-parallel ranks (batch.balance); global denominators
            train_metrics = []
            for mb in S.minibatches(batch, batch_cfg.minibatches_per_step):
                step_batch = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                  completion_mask=mb.completion_mask, old_logp=mb.old_logp, advantages=mb.advantages,
                                  **opts)
                if mb.ref_logp is not None:
                    step_batch["ref_logp"] = mb.ref_logp
                if grpo.tis:
                    step_batch["rollout_logp"] = mb.rollout_logp
                if routes is not None:
                    step_batch["routes"] = mb.routes
                train_metrics.append(policy.train_step(step_batch, micro_batch_tokens=budget, balance=batch_cfg.balance))
            lap("time_train")
            if reference is not None and grpo.ref_update_interval and (step + 1) % grpo.ref_update_interval == 0:
                reference.model.load_state_dict(policy.model.state_dict())

            # metrics
            metrics = _step_metrics(rewards, rollout, batch, train_metrics, lengths, truncated, generated, kept_groups,
                                    len(set(rollout.group)), t)
            if grpo.old_logp == "recompute":  # else no trainer log-probs of the rollouts exist before the update
                metrics.update(mismatch_metrics(batch.rollout_logp, batch.old_logp,
                                                batch.completion_mask & batch.attention_mask,
                                                tis_cap=grpo.tis_cap if grpo.tis else None))
            for key, value in t.items():
                phase_totals[key] = phase_totals.get(key, 0.0) + value
            log.step(step, metrics)
            log.samples(step, [{"prompt": r.prompt, "completion": text, "reward": _num(rewards.total[i]),
                                "advantage": float(adv[i]), "finish_reason": rollout.completions[i].finish_reason}
                               for i, (r, text) in enumerate(zip(rollout.records, rollout.texts))
                               if i < cfg.run.samples_per_step])
            if progress:
                log.progress(step, metrics, start_step)


            last = step + 1 == cfg.run.steps
            if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                save(step)
            if stop.agreed() and not last:
                if (data_state or {}).get("step") != step + 1:
                    save(step)
                stopped_after = step + 1
                break
    if stopped_after is not None:
        log.note(f"stopped by SIGTERM after step {stopped_after} of {cfg.run.steps}; the checkpoint is saved: "
                 f"resume with `r1mega train --resume {run_dir}`")
        close()
        return {"stopped_after_step": stopped_after, "steps": cfg.run.steps, "run_dir": str(run_dir)}

    # the end: evaluation of the final policy, its Hugging Face export, the summary
    colocation.refit()
    run_eval(cfg.run.steps)
    final = export_final(policy, run_dir, replace=start_step < cfg.run.steps)  # this call trained: a new final
    before, after = evals.get("0", {}), evals.get(str(cfg.run.steps), {})
    summary = {
        "base_model": str(inputs.model_dir.resolve()), "final_model": str(final.resolve()),
        "heldout_file": str((run_dir / "heldout.jsonl").resolve()) if inputs.heldout else None,
        "heldout_accuracy_before": before.get("pass_at_1"), "heldout_accuracy_after": after.get("pass_at_1"),
        "format_rate_before": before.get("format_rate"), "format_rate_after": after.get("format_rate"),
        "response_length_after": after.get("response_length_mean"), "steps": cfg.run.steps,
        "wall_s": time.perf_counter() - wall, "inputs_s": inputs_s, "phase_seconds": phase_totals,
    }
    if rank0:
        from r1mega.utils.io import atomic_write_text

        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_run(run_dir)
        log.note(_summary_text(summary))
    close()
    return summary


# ---------------------------------------------------------------------------------------------
def _num(x) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def _select_rewards(rewards: S.Rewards, rows: Sequence[int]) -> S.Rewards:
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    return S.Rewards(rewards.total[idx], {k: v[idx] for k, v in rewards.values.items()}, dict(rewards.errors))


def _concat_rewards(parts: Sequence[S.Rewards]) -> S.Rewards:
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p.errors.items():
            errors[k] = errors.get(k, 0) + v
    return S.Rewards(torch.cat([p.total for p in parts]), {k: torch.cat([p.values[k] for p in parts])
                                                          for k in parts[0].values}, errors)


def _step_metrics(rewards, rollout, batch, train_metrics, lengths, truncated, generated, kept_groups, groups, t):
    m: dict[str, float] = {"reward_mean": _nanmean(rewards.total),
                           "reward_scored_frac": float((~torch.isnan(rewards.total)).double().mean())}
    for name, values in rewards.values.items():
        m[f"reward_{name}"] = _nanmean(values)
    m["accuracy"] = m.get("reward_accuracy", math.nan)
    m["format_rate"] = next((v for k, v in m.items() if k.startswith("reward_format")), math.nan)
    m.update(response_length_mean=float(lengths.double().mean()), response_length_max=float(lengths.max()),
             truncation_rate=float(truncated.double().mean()), sequences=float(len(rollout)), groups=float(groups),
             dynamic_groups_kept=float(kept_groups), reward_errors=float(sum(rewards.errors.values())))
    cm = batch.completion_mask
    m["entropy_estimate"] = float(-(batch.old_logp[cm]).double().mean()) if cm.any() else math.nan
    for key in ("loss", "grad_norm", "lr", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean",
                "approx_kl", "kl_mean", "tis_weight_mean"):
        vals = [tm[key] for tm in train_metrics if key in tm]
        if vals:
            m[key] = sum(vals) / len(vals)
    m["ratio_max"] = max(tm["ratio_max"] for tm in train_metrics)
    m["optimizer_steps"] = train_metrics[-1]["step"]
    rollout_s = t.get("time_rollout", 0.0)
    m["rollout_tokens_per_s"] = generated and sum(len(c) for c in rollout.completions) / max(rollout_s, 1e-9)
    m.update(t)
    m["seconds"] = sum(t.values())
    return m


def _save_reference(reference, run_dir: Path, step: int, interval: int) -> Optional[Path]:
    """The reference policy's weights when it has moved (grpo.ref_update_interval), as a HF dir."""
    import torch.distributed as dist

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


def _summary_text(s: dict) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    phases = ", ".join(f"{k[5:]} {v:.0f}s" for k, v in sorted(s["phase_seconds"].items()))
    return (f"held-out pass@1 {fmt(s['heldout_accuracy_before'])} -> {fmt(s['heldout_accuracy_after'])}, "
            f"format {fmt(s['format_rate_before'])} -> {fmt(s['format_rate_after'])}, "
            f"response length {fmt(s['response_length_after'])}; {s['steps']} steps in "
            f"{s['wall_s'] - s['inputs_s']:.0f}s ({phases})"
            + (f", after {s['inputs_s']:.0f}s of setup (the base model built)" if s["inputs_s"] >= 10 else "")
            + f"; final model: {s['final_model']}")


__all__ = ["TrainError", "train", "resolve_inputs"]
