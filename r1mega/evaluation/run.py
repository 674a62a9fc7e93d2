"""``r1mega eval``: a Hugging Face model on problems with gold answers, by the R1 paper's protocol.

For each problem: `samples` completions at `temperature`/`top_p` (0.6 / 0.95 in the paper) and one
greedy completion from the ``hf`` rollout engine (weights read from the model's safetensors);
every completion scored by the rule rewards in the reward pool (accuracy, format, and language
consistency where the record names a language). Reported, as means over problems:

* ``pass_at_1``: the mean accuracy of the samples (a sample whose scoring failed is left out);
* ``cons_at_k``: the accuracy of the majority final answer of the k samples (math answers grouped
  by math-verify equivalence, other tasks by equal text; code problems have none);
* ``greedy_accuracy``, ``format_rate``, ``response_length_mean``;
* ``language_rate``: the mean language consistency of the samples' reasoning, over records that
  name a language and samples whose reasoning has words (n/a otherwise);
* ``mixing_rate``: the share of those samples whose reasoning mixes languages (consistency
  below 1: some words are not in the prompt's language), the figure DeepSeek-R1's
  language-consistency reward is meant to bring down.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from r1mega.evaluation.metrics import cons_at_k, mean

TEMPLATES = ("r1_zero", "chat", "raw")


class EvalError(ValueError):
    """Bad evaluation input; the message is one line naming the file, row and field."""


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    template: str = "r1_zero"
    format_style: str = "answer-tags"
    greedy: bool = True
    seed: int = 0
    workers: Optional[int] = None
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise EvalError(f"--samples: {self.samples} must be >= 1")
        if not self.temperature > 0:
            raise EvalError(f"--temperature: {self.temperature} must be > 0 (the greedy pass is separate)")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"--top-p: {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise EvalError(f"--max-new-tokens: {self.max_new_tokens} must be >= 1")
        if self.template not in TEMPLATES:
            raise EvalError(f"--template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.format_style not in ("answer-tags", "summary"):
            raise EvalError(f"--format-style: {self.format_style!r} is not 'answer-tags' or 'summary'")


def load_eval_problems(path: str | Path, max_prompts: Optional[int] = None, *, allow_general: bool = False) -> list:
    """The problems of `path` (r1mega.data rows), each with what its accuracy needs: a gold
    ``answer`` for math and countdown, ``tests`` for code; "general" rows have no rule and are
    refused unless `allow_general` (a judge will decide them)."""
    from r1mega.data import DataError, load_prompts
    from r1mega.rewards import GoldAnswerError, parse_gold

    try:
        records = load_prompts(path)
    except DataError as err:
        raise EvalError(str(err)) from None
    for r in records:
        where = f"{path}: id {r.id!r}"
        if r.task in ("math", "countdown") and not r.answer:
            raise EvalError(f"{where}: field 'answer': missing; evaluation needs a gold answer")
        if r.task == "code" and not r.tests:
            raise EvalError(f"{where}: field 'tests': missing; evaluation of code needs tests")
        if r.task == "general" and not allow_general:
            raise EvalError(f"{where}: field 'task': 'general' has no rule to verify it by")
        if r.task == "math":
            try:
                parse_gold(r.answer)
            except GoldAnswerError as err:
                raise EvalError(f"{where}: field 'answer': {err}") from None
    return records[:max_prompts] if max_prompts else records


def evaluate_model(model_dir: str | Path, records: Sequence, settings: EvalSettings = EvalSettings(), *,
                   progress: bool = True) -> dict:
    """Generate and score; returns {"summary": {...}, "problems": [per-problem dicts]}."""
    import sys

    from r1mega.evaluation.generation import GenerationError, ScoredSampler
    from r1mega.rewards import equivalent_answers, extract_final_answer
    from r1mega.rollout import SamplingParams

    start = time.perf_counter()
    if any(r.task == "code" for r in records):
        from r1mega.rewards.sandbox import SandboxUnavailable, require_backend

        try:
            require_backend()
        except SandboxUnavailable as err:
            raise EvalError(f"code problems are scored in a sandbox, but {err}") from None
    try:
        sampler = ScoredSampler(model_dir, template=settings.template, max_prompt_tokens=settings.max_prompt_tokens,
                                format_style=settings.format_style, seed=settings.seed, workers=settings.workers,
                                timeout_s=settings.timeout_s)
    except GenerationError as err:
        raise EvalError(str(err)) from None
    rows: list[dict] = []
    with sampler:
        try:
            prompt_ids = sampler.prompt_ids(records)
        except GenerationError as err:
            raise EvalError(str(err)) from None
        stop = sampler.stop_token_ids
        sampled_params = SamplingParams(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                                        max_new_tokens=settings.max_new_tokens, seed=settings.seed, stop_token_ids=stop)
        greedy_params = SamplingParams(n=1, temperature=0.0, max_new_tokens=settings.max_new_tokens,
                                       stop_token_ids=stop)
        chunk = max(1, 64 // settings.samples)
        for a in range(0, len(records), chunk):
            part, ids = records[a:a + chunk], prompt_ids[a:a + chunk]
            sampled = sampler.run(part, ids, sampled_params, first_prompt_index=a)
            greedy = sampler.run(part, ids, greedy_params) if settings.greedy else [[] for _ in part]
            for record, samples, g in zip(part, sampled, greedy):
                rows.append(_problem_row(record, samples, g[0] if g else None, equivalent_answers,
                                         extract_final_answer, sampler.format_name))
            if progress:
                sys.stderr.write(f"\reval {len(rows)}/{len(records)} problems, pass@1 so far "
                                 f"{mean([r['pass_at_1'] for r in rows]):.3f} ")
                sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    summary = {
        "model": str(Path(model_dir).resolve()), "problems": len(rows), **asdict(settings),
        **{key: mean([r[key] for r in rows]) for key in ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate",
                                                          "language_rate", "mixing_rate", "response_length_mean")},
        "seconds": time.perf_counter() - start,
    }
    return {"summary": summary, "problems": rows}


def _nan(x: Optional[float]) -> float:
    return math.nan if x is None else float(x)


def _problem_row(record, samples: list[dict], greedy: Optional[dict], equivalent, extract, fmt: str) -> dict:
    acc = [_nan(s["accuracy"]) for s in samples]
    answers = [extract(s["completion"])[0] for s in samples]
    same = equivalent if record.task == "math" else (lambda x, y: x == y)
    kept = [(a, c) for a, c in zip(answers, acc) if not math.isnan(c)]
    cons = math.nan if record.task == "code" or not kept else cons_at_k([a for a, _ in kept], [c == 1.0 for _, c in kept], same)
    return {"id": record.id, "task": record.task, "pass_at_1": mean(acc), "cons_at_k": cons,
            "greedy_accuracy": _nan(greedy["accuracy"]) if greedy else math.nan,
            "format_rate": mean([_nan(s[fmt]) for s in samples]),
            "language_rate": mean([_nan(s["language"]) for s in samples]),
            "mixing_rate": mean([_nan(s["language"]) if s["language"] is None else float(s["language"] < 1.0)
                                 for s in samples]),
            "response_length_mean": mean([float(s["tokens"]) for s in samples]),
            "samples": samples, "greedy": greedy}


def write_results(out_dir: str | Path, result: dict) -> Path:
    """summary.json and problems.jsonl (every completion with its scores), atomically."""
    from r1mega.utils.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "problems.jsonl", "".join(json.dumps(_json(r), ensure_ascii=False) + "\n"
                                                          for r in result["problems"]))
    atomic_write_text(out_dir / "summary.json", json.dumps(_json(result["summary"]), indent=2) + "\n")
    return out_dir / "summary.json"


def _json(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json(v) for v in x]
    return x


def summary_table(summary: dict) -> str:
    keys = ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate", "mixing_rate",
            "response_length_mean")
    heads = ("pass@1", f"cons@{summary['samples']}", "greedy", "format", "language", "mixing", "length")
    head = f"{'model':<40} " + " ".join(f"{h:>9}" for h in heads)
    name = summary["model"] if len(summary["model"]) <= 40 else "..." + summary["model"][-37:]
    cells = " ".join(f"{'n/a':>9}" if math.isnan(summary[k]) else f"{summary[k]:>9.3f}" if k != "response_length_mean"
                     else f"{summary[k]:>9.1f}" for k in keys)
    return (f"{summary['problems']} problems x {summary['samples']} samples at T {summary['temperature']}, "
            f"top-p {summary['top_p']} (+ greedy), {summary['seconds']:.0f}s\n{head}\n{'-' * len(head)}\n{name:<40} {cells}")


__all__ = ["EvalError", "EvalSettings", "evaluate_model", "load_eval_problems", "summary_table",
           "write_results"]
