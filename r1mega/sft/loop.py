"""The SFT loop: ``r1mega sft``. Every rank of a torchrun job runs it; rank 0 writes the run.

    read + validate + tokenize the rows (before any work) -> per epoch: shuffle (seeded by the
    epoch), pack into rows of at most sft.row_tokens (the C++ packer) -> sft.rows_per_step rows
    per step: policy.sft_step (rows spread over data parallelism by batch.balance, micro-batches
    of batch.micro_batch_tokens, loss = mean NLL of the completion tokens of the whole step)
    -> metrics -> checkpoint on run.save_every -> final/ (a Hugging Face directory)

The plan (which examples go in which row of which step) is a pure function of the data, the
config and the seed, so a resumed run (``--resume RUN``: the last checkpoint's weights,
optimizer, RNG and step) continues exactly where the interrupted one was.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from r1mega.config import Config
from r1mega.data import DataError, epoch_permutation
from r1mega.data.r1_corpus import cold_start_rows
from r1mega.models import load_policy
from r1mega.run.logs import METRICS, RunLog, plot_run, read_jsonl, truncate_after
from r1mega.run.panels import SFT_PANELS
from r1mega.run.rundir import export_final, quiet_known_warnings, resolve_model, resume_source
from r1mega.sft.data import SFTExample, load_sft_data, tokenize_all
from r1mega.sft.packing import TokenizedExample, collate, pack_examples
from r1mega.utils.io import atomic_write_text



class SFTError(ValueError):
    """A problem with the run's inputs, found before any work; the message is one line."""


@dataclass
class SFTInputs:
    model_dir: Path
    hf_dir: Path
    examples: list[SFTExample]
    source: str  # the data's name in messages


def resolve_sft_inputs(cfg: Config) -> SFTInputs:
    run, sft = cfg.run, cfg.sft
    if run.model is not None and not Path(run.model).is_dir():
        raise SFTError(f"run.model: {run.model!r} is not a directory (a Hugging Face model or an r1mega checkpoint)")
    if sft.row_tokens > cfg.batch.micro_batch_tokens:
        raise SFTError(f"sft.row_tokens {sft.row_tokens} > batch.micro_batch_tokens {cfg.batch.micro_batch_tokens}: a "
                       "packed row would not fit one micro-batch")
    try:
        if sft.data is not None:
            examples, source = load_sft_data(sft.data), sft.data
        else:
            examples = [SFTExample(r["id"], prompt=r["prompt"], completion=r["completion"])
                        for r in cold_start_rows(seed=run.seed)]
            source = "the embedded cold-start set"
    except DataError as err:
        raise SFTError(str(err)) from None
    model_dir, hf_dir = resolve_model(run.model, chat=run.template == "chat")
    return SFTInputs(model_dir, hf_dir, examples, source)


def plan_steps(tokenized: list[TokenizedExample], *, epochs: int, rows_per_step: int, row_tokens: int, pack: bool,
               seed: int) -> list[tuple[int, list[list[int]]]]:
    """[(epoch, rows)] per optimizer step; a row is a list of example indices. Each epoch visits
    the examples in a seeded order (r1mega.data.epoch_permutation) and packs them in that order's
    chunks of rows_per_step * row_tokens tokens, so a step's rows hold a contiguous stretch of
    the shuffled data (the last step of an epoch may hold fewer rows)."""
    steps = []
    for epoch in range(epochs):
        order = [int(i) for i in epoch_permutation(len(tokenized), seed=seed, epoch=epoch)]
        if not pack:
            rows = [[i] for i in order]
        else:
            rows, chunk, budget = [], [], rows_per_step * row_tokens
            used = 0
            for i in order + [None]:
                n = len(tokenized[i].input_ids) if i is not None else 0
                if i is None or (chunk and used + n > budget):
                    packed = pack_examples([len(tokenized[j].input_ids) for j in chunk], row_tokens)
                    rows += [[chunk[k] for k in row] for row in packed]
                    chunk, used = [], 0
                if i is not None:
                    chunk.append(i)
                    used += n
        steps += [(epoch, rows[k:k + rows_per_step]) for k in range(0, len(rows), rows_per_step)]
    return steps


def sft(cfg: Config, *, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Run (or resume) the SFT job `cfg` describes; returns the summary (also summary.json)."""
    import torch.distributed as dist
    import transformers

    wall = time.perf_counter()
    quiet_known_warnings()
    inputs = resolve_sft_inputs(cfg)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(inputs.hf_dir))
    try:
        tokenized = tokenize_all(inputs.examples, tokenizer, cfg.run.template, cfg.sft.row_tokens, inputs.source)
    except ValueError as err:
        raise SFTError(str(err)) from None
    plan = plan_steps(tokenized, epochs=cfg.sft.epochs, rows_per_step=cfg.sft.rows_per_step,
                      row_tokens=cfg.sft.row_tokens, pack=cfg.sft.pack, seed=cfg.run.seed)
    if cfg.sft.max_steps:
        plan = plan[:cfg.sft.max_steps]
    run_dir = Path(resume) if resume is not None else cfg.run.run_dir
    try:
        resumed_from = resume_source(run_dir, resuming=resume is not None)
    except ValueError as err:
        raise SFTError(str(err)) from None
    checkpoints = run_dir / "checkpoints"
    policy = load_policy(resumed_from or inputs.model_dir, parallel=cfg.parallel, optim=cfg.optim, seed=cfg.run.seed,
                         policy=cfg.policy, total_steps=len(plan))
    data_state = policy.data_state if resumed_from else None
    start_step = data_state["step"] if data_state else 0
    rank0 = dist.get_rank() == 0
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir)
        truncate_after(run_dir / METRICS, start_step - 1)
    total = len(plan)
    log = RunLog(run_dir, enabled=rank0, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                 config=cfg.to_dict(), total_steps=total)
    if rank0 and start_step == 0:
        log.note(f"SFT of {inputs.model_dir} on {len(tokenized)} examples from {inputs.source}: {cfg.sft.epochs} "
                 f"epoch(s), {total} steps of up to {cfg.sft.rows_per_step} rows x {cfg.sft.row_tokens} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trained_s = float((data_state or {}).get("train_seconds", 0.0))
    for step in range(start_step, total):
        clock = time.perf_counter()
        epoch, rows = plan[step]
        batch = collate(tokenized, rows, pad_id=pad)
        if not cfg.sft.pack:
            batch.pop("segment_ids")  # one example per row: plain causal rows
        metrics = policy.sft_step(batch, micro_batch_tokens=cfg.batch.micro_batch_tokens, balance=cfg.batch.balance)
        metrics["optimizer_steps"] = metrics.pop("step")
        seconds = time.perf_counter() - clock
        trained_s += seconds
        real = int(batch["attention_mask"].sum())
        metrics.update(epoch=float(epoch), rows=float(len(rows)), examples=float(sum(map(len, rows))),
                       padding_frac=1.0 - real / batch["attention_mask"].numel(), tokens_per_s=real / max(seconds, 1e-9),
                       seconds=seconds)
        log.step(step, metrics)
        if progress:
            log.progress(step, metrics, start_step,
                         line=f"loss {metrics['loss']:.4f} epoch {epoch + 1}/{cfg.sft.epochs} tok/s "
                              f"{metrics['tokens_per_s']:.0f}")
        last = step + 1 == total
        if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
            state = {"step": step + 1, "train_seconds": trained_s}
            policy.save_checkpoint(checkpoints, data_state=state, keep_last=cfg.run.keep_checkpoints)

    # Re-exported when this call trained (a run resumed with more epochs); a run killed after
    # its export keeps it.
    final = export_final(policy, run_dir, replace=start_step < total)
    history = read_jsonl(run_dir / METRICS) if rank0 else []
    losses = [m["loss"] for m in history if m.get("loss") is not None]
    summary = {"base_model": str(inputs.model_dir.resolve()), "final_model": str(final.resolve()),
               "data": inputs.source, "examples": len(tokenized), "steps": total, "epochs": cfg.sft.epochs,
               "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan,
               "train_seconds": trained_s, "wall_s": time.perf_counter() - wall}
    if rank0:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_run(run_dir, panels=SFT_PANELS)
        log.note(f"SFT loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} in {total} steps "
                 f"({trained_s:.0f}s); final model: {summary['final_model']}")
    log.close()
    return summary


__all__ = ["SFTError", "plan_steps", "resolve_sft_inputs", "sft"]
