"""The GRPO loop, ``r1mega train``: start reading here.

One step of R1-Zero's recipe is the body of the ``for`` loop in :func:`train`, a list of phases
(:mod:`r1mega.trainer.phases`, each a function with a contract):

    refit             the rollout engines take the policy's weights (colocated: the training state
                      is offloaded while they generate)
    collect_groups    sample prompts, render the template, generate G completions of each,
                      score them with the rule rewards; DAPO's dynamic sampling refills groups
                      whose rewards are all equal
    make_train_batch  overlong handling, advantages (r - group mean) / group std, padded rows
    release           the engines sleep; the optimizer state comes back
    fill_logprobs     the sampling policy's log-probs and the reference's (for the KL term)
    train_minibatches one optimizer step per mini-batch on the clipped loss (the run's LossSpec)
    move_reference    R1's periodic reference update
    report            metrics.jsonl / TensorBoard, sample completions, the progress line
    save / evaluate   checkpoints and held-out pass@1 on their intervals

Where things live: the run's objects are built once by :func:`r1mega.trainer.setup.setup_run`
(inputs checked first, in :mod:`r1mega.trainer.inputs`); the tensor work of a step (rollouts,
rewards, advantages, the train batch) is :mod:`r1mega.trainer.steps`; the loss math is
:mod:`r1mega.algo`; the policy (megatron-core) is :mod:`r1mega.models`; the engines are
:mod:`r1mega.rollout`; the run directory, logs and graceful stop are :mod:`r1mega.run`.

Every rank of a torchrun job runs this loop; rank 0 writes the run. Engines live on the first
rank of each data-parallel replica (tensor and pipeline rank 0) and get the weights point to
point; each generates its replica's share of the prompts (seeded by the global prompt index, so
every layout samples the same completions); every rank then holds the whole step's rollout and
trains on it (the policy splits rows over data parallelism).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from r1mega.config import Config
from r1mega.run.logs import plot_run
from r1mega.run.panels import GRPO_PANELS
from r1mega.run.rundir import export_final
from r1mega.run.stop import GracefulStop
from r1mega.trainer.failures import StepFailed, reported_as_step_failure
from r1mega.trainer.inputs import TrainError, resolve_inputs
from r1mega.trainer.phases import (
    collect_groups,
    fill_logprobs,
    make_train_batch,
    move_reference,
    run_heldout_eval,
    save,
    train_minibatches,
)
from r1mega.trainer.report import run_summary, sample_rows, step_metrics, summary_text
from r1mega.trainer.setup import GRPORun, setup_run
from r1mega.trainer.timer import PhaseTimer
from r1mega.utils.io import atomic_write_text


def train(cfg: Config, *, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Run (or resume) the GRPO job `cfg` describes; returns the summary (also summary.json)."""
    wall = time.perf_counter()
    run = setup_run(cfg, resume)
    grpo, step, stopped_after = cfg.grpo, run.start_step, None
    with GracefulStop() as stop, reported_as_step_failure(lambda: (step, run.data_state), run.run_dir, run.rank0):
        for step in range(run.start_step, cfg.run.steps):
            timer = PhaseTimer()
            run.colocation.refit()
            timer.lap("refit")
            if step == 0 or (cfg.eval.every and step % cfg.eval.every == 0):
                run_heldout_eval(run, step)
                timer.lap("eval")
            scored = collect_groups(run, step, timer)
            if not len(scored.rollout):
                run.log.note(f"step {step}: every group had equal rewards after {scored.rounds} rounds; no update")
                run.log.step(step, {"skipped": 1.0, "dynamic_groups_kept": 0.0})
                continue
            batch = make_train_batch(scored, run)
            run.colocation.release()
            timer.lap("sleep")
            fill_logprobs(run, batch)
            timer.lap("logprobs")
            train_metrics = train_minibatches(run, batch)
            timer.lap("train")
            move_reference(run, step)
            metrics = step_metrics(scored.rewards, scored.rollout, batch, train_metrics, scored.generated,
                                   scored.kept_groups, timer.seconds, recomputed=grpo.old_logp == "recompute",
                                   mismatch_tis_cap=grpo.tis_cap if grpo.tis else None)
            for key, value in timer.seconds.items():
                run.phase_seconds[key] = run.phase_seconds.get(key, 0.0) + value
            run.log.step(step, metrics)
            run.log.samples(step, sample_rows(scored.rollout, scored.rewards, batch.advantages,
                                              cfg.run.samples_per_step))
            if progress:
                run.log.progress(step, metrics, run.start_step)
            last = step + 1 == cfg.run.steps
            if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                save(run, step)
            if stop.agreed() and not last:
                if (run.data_state or {}).get("step") != step + 1:
                    save(run, step)
                stopped_after = step + 1
                break
    if stopped_after is not None:
        run.log.note(f"stopped by SIGTERM after step {stopped_after} of {cfg.run.steps}; the checkpoint is saved: "
                     f"resume with `r1mega train --resume {run.run_dir}`")
        run.close()
        return {"stopped_after_step": stopped_after, "steps": cfg.run.steps, "run_dir": str(run.run_dir)}
    return finish(run, wall)


def finish(run: GRPORun, wall: float) -> dict:
    """The end of a run: the final policy's held-out evaluation, its Hugging Face export (new when
    this call trained), summary.json, the curves and the summary line."""
    steps = run.cfg.run.steps
    run.colocation.refit()
    run_heldout_eval(run, steps)
    final = export_final(run.policy, run.run_dir, replace=run.start_step < steps)
    summary = run_summary(base_model=run.inputs.model_dir, final_model=final,
                          heldout_file=run.run_dir / "heldout.jsonl" if run.inputs.heldout else None,
                          evals=run.evals, steps=steps, wall_s=time.perf_counter() - wall, inputs_s=run.inputs_s,
                          phase_seconds=run.phase_seconds)
    if run.rank0:
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_run(run.run_dir, panels=GRPO_PANELS)
        run.log.note(summary_text(summary))
    run.close()
    return summary


__all__ = ["StepFailed", "TrainError", "finish", "resolve_inputs", "train"]
