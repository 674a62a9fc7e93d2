"""``r1mega sample``: rejection sampling from a checkpoint into SFT data (DeepSeek-R1, stage 3).

k completions per prompt from the ``hf`` engine, scored by the rule rewards; kept by
:mod:`r1mega.rejection.filters` (verified correct, readable, at most m per prompt, deduplicated).
Prompts no rule can verify ("general") need a judge: ``judge(record, completion) -> bool``, a
module-level function named ``package.module:function`` (for instance a generative judge that
gives a model the reference answer and the prediction). Output: SFT JSONL rows with provenance,
and a report of acceptance rates per task next to it (``<out>.report.json``).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from r1mega.data import base_corpus
from r1mega.evaluation import EvalSettings, fit_eval_problems, load_eval_problems
from r1mega.evaluation.generation import ScoredSampler
from r1mega.rejection.filters import REASONS, FilterSettings, select
from r1mega.rewards import load_reward
from r1mega.rewards import sandbox  # through the module: the tests replace its require_backend
from r1mega.rollout import SamplingParams
from r1mega.utils.io import atomic_write_text


def sft_row(record, sample: dict, source: Path, format_name: str) -> dict:
    """One SFT row: the prompt, the kept completion, and where it came from."""
    return {"id": f"{record.id}#{sample['sample_index']}", "prompt": record.prompt, "completion": sample["completion"],
            "task": record.task, "language": record.language,
            "provenance": {"source": str(source), "prompt_id": record.id, "sample_index": sample["sample_index"],
                           "tokens": sample["tokens"],
                           "rewards": {k: sample.get(k) for k in ("accuracy", format_name, "language")}}}


def rejection_sample(model_dir: str | Path, records: Sequence, out: str | Path, *, samples: int = 8,
                     temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 1024,
                     template: str = "r1_zero", format_style: str = "answer-tags",
                     filters: FilterSettings = FilterSettings(), judge: Optional[Callable] = None, seed: int = 0,
                     max_prompt_tokens: int = 2048, progress: bool = True) -> dict:
    """Sample, filter and write `out` (JSONL) and its report atomically; returns the report."""
    start = time.perf_counter()
    if any(r.task == "code" for r in records):
        try:
            sandbox.require_backend()
        except sandbox.SandboxUnavailable as err:
            raise ValueError(f"code prompts are verified in a sandbox, but {err}") from None
    out = Path(out)
    rows: list[dict] = []
    tasks: dict[str, Counter] = {}
    with ScoredSampler(model_dir, template=template, format_style=format_style, seed=seed,
                       max_prompt_tokens=max_prompt_tokens) as sampler:
        prompt_ids = sampler.prompt_ids(records)
        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=seed, stop_token_ids=sampler.stop_token_ids)
        chunk = max(1, 64 // samples)
        for a in range(0, len(records), chunk):
            part = records[a:a + chunk]
            for record, scored in zip(part, sampler.run(part, prompt_ids[a:a + chunk], params, first_prompt_index=a)):
                verdicts = [bool(judge(record, s["completion"])) for s in scored] \
                    if record.task == "general" and judge is not None else None
                kept, reasons = select(scored, filters, format_name=sampler.format_name, verdicts=verdicts)
                count = tasks.setdefault(record.task, Counter())
                count.update(prompts=1, samples=len(scored), kept=len(kept), prompts_with_kept=int(bool(kept)))
                count.update(r for r in reasons if r is not None)
                rows += [sft_row(record, scored[i], sampler.model_dir, sampler.format_name) for i in kept]
            if progress:
                done = min(a + chunk, len(records))
                sys.stderr.write(f"\rsample {done}/{len(records)} prompts, {len(rows)} kept ")
                sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report = {"source": str(Path(model_dir).resolve()), "output": str(out.resolve()), "samples_per_prompt": samples,
              "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
              "filters": asdict(filters), "kept": len(rows), "seconds": time.perf_counter() - start,
              "tasks": {task: {"prompts": c["prompts"], "samples": c["samples"], "kept": c["kept"],
                               "acceptance_rate": c["kept"] / max(c["samples"], 1),
                               "prompts_with_kept": c["prompts_with_kept"],
                               "rejected": {r: c[r] for r in REASONS if c[r]}}
                        for task, c in sorted(tasks.items())}}
    atomic_write_text(report_path(out), json.dumps(report, indent=2) + "\n")
    return report


def filter_settings(cfg) -> FilterSettings:
    """The filters of a config's sample section."""
    s = cfg.sample
    return FilterSettings(min_language=s.min_language, max_tokens=s.max_tokens, max_repeats=s.max_repeats,
                          max_per_prompt=s.max_per_prompt)


def sample_command(cfg, *, out: str | Path, progress: bool = True) -> int:
    """``r1mega sample``: rejection sampling of cfg.run.model on cfg.run.data (None: the embedded
    task's train split) with cfg.sample's settings, the prompt template run.template, the format
    rewards.format_style and the seed run.seed; writes `out` and its report."""
    s = cfg.sample
    if cfg.run.model is None:
        raise ValueError("sample: no model: give --model DIR (run.model)")
    # the same checks of the sampling settings as eval's, before any work
    EvalSettings(samples=s.samples, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                 template=cfg.run.template, format_style=cfg.rewards.format_style)
    filters = filter_settings(cfg)
    judge = None
    if s.judge:
        try:
            judge = load_reward(s.judge)
        except ValueError as err:
            raise ValueError(f"--judge: {err}") from None
    if cfg.run.data:
        records = load_eval_problems(cfg.run.data, s.max_prompts, allow_general=judge is not None, data=cfg.data)
    else:
        records = base_corpus.problems("train", s.max_prompts, seed=0)
    records = fit_eval_problems(cfg, cfg.run.model, records, cfg.run.data or "the embedded task",
                                "sample.max_new_tokens", s.max_new_tokens)
    report = rejection_sample(cfg.run.model, records, out, samples=s.samples, temperature=s.temperature,
                              top_p=s.top_p, max_new_tokens=s.max_new_tokens, template=cfg.run.template,
                              format_style=cfg.rewards.format_style, filters=filters, judge=judge,
                              seed=cfg.run.seed, max_prompt_tokens=cfg.rollout.max_prompt_tokens, progress=progress)
    print(report_table(report))
    print(f"wrote {report['kept']} rows to {out} and the report to {report_path(out)}")
    return 0


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".report.json")


def report_table(report: dict) -> str:
    head = f"{'task':<10} {'prompts':>8} {'samples':>8} {'kept':>6} {'accept':>7} {'prompts kept':>13}  rejected"
    lines = [head, "-" * len(head)]
    for task, t in report["tasks"].items():
        why = ", ".join(f"{k} {v}" for k, v in t["rejected"].items()) or "-"
        lines.append(f"{task:<10} {t['prompts']:>8} {t['samples']:>8} {t['kept']:>6} {t['acceptance_rate']:>7.3f} "
                     f"{t['prompts_with_kept']:>13}  {why}")
    return "\n".join(lines)


__all__ = ["filter_settings", "rejection_sample", "report_path", "report_table", "sample_command", "sft_row"]
