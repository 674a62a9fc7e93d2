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
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from r1mega.config import Config, DataConfig, EvalConfig
from r1mega.data import DataError, base_corpus, load_prompts, r1_corpus
from r1mega.evaluation.generation import CompletionScorer, GenerationError, ScoredSampler
from r1mega.evaluation.benchmarks import breakdown_table, breakdowns
from r1mega.evaluation.metrics import cons_at_k, mean
from r1mega.evaluation.prompt_fit import fit_to_model
from r1mega.rewards import GoldAnswerError, equivalent_answers, extract_final_answer, parse_gold
from r1mega.rewards import sandbox  # through the module: the tests replace its require_backend
from r1mega.recipes import BENCHMARKS
from r1mega.rollout import SamplingParams
from r1mega.utils.io import atomic_write_text

TEMPLATES = ("r1_zero", "chat", "raw")
# The per-problem figures, averaged over problems into the summary.
SUMMARY_KEYS = ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate", "mixing_rate",
                "response_length_mean")


class EvalError(ValueError):
    """Bad evaluation input; the message is one line naming the file, row and field."""


_PROTOCOL = EvalConfig()  # R1's protocol numbers have one home: the config's eval section


@dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation runs with; :meth:`from_config` reads it from a Config (the eval
    section, the run's template and seed, the rollout's prompt budget, the rewards' format style
    and pool size)."""

    samples: int = _PROTOCOL.samples
    temperature: float = _PROTOCOL.temperature
    top_p: float = _PROTOCOL.top_p
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    template: str = "r1_zero"
    format_style: str = "answer-tags"
    greedy: bool = _PROTOCOL.greedy
    seed: int = 0
    workers: Optional[int] = None
    timeout_s: float = 10.0
    max_batch_rows: int = 256

    @classmethod
    def from_config(cls, cfg: Config) -> "EvalSettings":
        return cls(samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                   max_new_tokens=cfg.eval.new_tokens(cfg.rollout), max_prompt_tokens=cfg.rollout.max_prompt_tokens,
                   template=cfg.run.template, format_style=cfg.rewards.format_style, greedy=cfg.eval.greedy,
                   seed=cfg.run.seed, workers=cfg.rewards.workers or None, timeout_s=cfg.rewards.timeout_s,
                   max_batch_rows=cfg.rollout.max_batch_rows)

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

    def sampling(self, stop_token_ids: Sequence[int]) -> tuple[SamplingParams, SamplingParams]:
        """The k samples' and the greedy pass's SamplingParams."""
        sampled = SamplingParams(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                                 max_new_tokens=self.max_new_tokens, seed=self.seed, stop_token_ids=tuple(stop_token_ids))
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens,
                                stop_token_ids=tuple(stop_token_ids))
        return sampled, greedy


def load_eval_problems(path: str | Path, max_prompts: Optional[int] = None, *, allow_general: bool = False,
                       data: Optional[DataConfig] = None) -> list:
    """The problems of `path` (read as `data` says: its format and columns; r1mega rows by
    default), each with what its accuracy needs: a gold ``answer`` for math and countdown,
    ``tests`` for code; "general" rows have no rule and are refused unless `allow_general` (a
    judge will decide them)."""
    try:
        records = load_prompts(path, **(data.loader_kwargs() if data is not None else {}))
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


def fit_eval_problems(cfg: Config, model: str | Path, records: list, source: str, new_tokens_key: str,
                      new_tokens: int) -> list:
    """`records` whose prompts fit the Hugging Face model in `model` (r1mega.evaluation.prompt_fit,
    data.overlong_prompts), checked before the model loads; EvalError (one line) otherwise."""
    if not (Path(model) / "config.json").is_file():
        raise EvalError(f"--model: {str(model)!r} is not a Hugging Face model directory (no config.json)")
    try:
        return fit_to_model(model, (source, records, new_tokens_key, new_tokens), template=cfg.run.template,
                            max_prompt_tokens=cfg.rollout.max_prompt_tokens, overlong=cfg.data.overlong_prompts)[0]
    except DataError as err:
        raise EvalError(str(err)) from None


def evaluate_prompts(generate: Callable, scorer: Optional[CompletionScorer], records: Sequence,
                     prompt_ids: Sequence[Sequence[int]], settings: EvalSettings, stop_token_ids: Sequence[int], *,
                     model: str = "", progress: bool = False) -> Optional[dict]:
    """The evaluator: R1's protocol over `records` (their rendered `prompt_ids`), shared by
    ``r1mega eval`` and the trainer's held-out evaluation so both give the same figures.

    `generate(prompt_ids, params, first_prompt_index=i)` returns the completions of the prompts
    (seeded by their global index i + row, so how they are split does not matter); in a
    distributed trainer every rank calls it (it is collective there). `scorer` scores them; a
    rank without one (not rank 0) takes part in generation only and gets None. The problems go
    in chunks of 64 samples; each gets the k samples and, with settings.greedy, one greedy
    completion. Returns {"summary": {...}, "problems": [per-problem dicts]}.
    """
    start = time.perf_counter()
    sampled_params, greedy_params = settings.sampling(stop_token_ids)
    rows: list[dict] = []
    chunk = max(1, 64 // settings.samples)
    for a in range(0, len(records), chunk):
        part, ids = records[a:a + chunk], prompt_ids[a:a + chunk]
        sampled = generate(ids, sampled_params, first_prompt_index=a)
        greedy = generate(ids, greedy_params, first_prompt_index=a) if settings.greedy else []
        if scorer is None:
            continue
        scored = scorer.score(part, sampled, first_prompt_index=a)
        scored_greedy = scorer.score(part, greedy, first_prompt_index=a) if settings.greedy else [[] for _ in part]
        for record, samples, g in zip(part, scored, scored_greedy):
            rows.append(_problem_row(record, samples, g[0] if g else None, scorer.format_name))
        if progress:
            sys.stderr.write(f"\reval {len(rows)}/{len(records)} problems, pass@1 so far "
                             f"{mean([r['pass_at_1'] for r in rows]):.3f} ")
            sys.stderr.flush()
    if progress and scorer is not None:
        sys.stderr.write("\n")
    if scorer is None:
        return None
    summary = {
        "model": model, "problems": len(rows), **asdict(settings),
        **{key: mean([r[key] for r in rows]) for key in SUMMARY_KEYS},
        "seconds": time.perf_counter() - start,
    }
    return {"summary": summary, "problems": rows}


def evaluate_model(model_dir: str | Path, records: Sequence, settings: EvalSettings = EvalSettings(), *,
                   progress: bool = True) -> dict:
    """:func:`evaluate_prompts` of the Hugging Face model in `model_dir` (the ``hf`` engine with
    its weights); returns {"summary": {...}, "problems": [per-problem dicts]}."""
    if any(r.task == "code" for r in records):
        try:
            sandbox.require_backend()
        except sandbox.SandboxUnavailable as err:
            raise EvalError(f"code problems are scored in a sandbox, but {err}") from None
    try:
        sampler = ScoredSampler(model_dir, template=settings.template, max_prompt_tokens=settings.max_prompt_tokens,
                                format_style=settings.format_style, seed=settings.seed, workers=settings.workers,
                                timeout_s=settings.timeout_s, max_batch_rows=settings.max_batch_rows)
    except GenerationError as err:
        raise EvalError(str(err)) from None
    with sampler:
        try:
            prompt_ids = sampler.prompt_ids(records)
        except GenerationError as err:
            raise EvalError(str(err)) from None
        return evaluate_prompts(sampler.generate, sampler.scorer, records, prompt_ids, settings,
                                sampler.stop_token_ids, model=str(Path(model_dir).resolve()), progress=progress)


def eval_command(cfg: Config, *, model: str, embedded: str = "addition", out: Optional[str] = None,
                 benchmark: Optional[str] = None, progress: bool = True) -> int:
    """``r1mega eval``: the model directory `model` on run.heldout's problems (else the embedded
    `embedded` held-out split), first eval.max_prompts of them, by the config's protocol.
    `benchmark` (r1mega.evaluation.benchmarks; its settings are already in `cfg`): named in the
    summary, with its breakdowns (MATH-500: per subject and level)."""
    limit = cfg.eval.max_prompts
    if cfg.run.heldout:
        records = load_eval_problems(cfg.run.heldout, limit, data=cfg.data)
    else:
        corpus = r1_corpus if embedded == "r1" else base_corpus
        records = corpus.problems("test", seed=cfg.run.seed)[:limit]
    records = fit_eval_problems(cfg, model, records, cfg.run.heldout or f"the embedded {embedded} split",
                                "eval.max_new_tokens", cfg.eval.new_tokens(cfg.rollout))
    result = evaluate_model(model, records, EvalSettings.from_config(cfg), progress=progress)
    print(summary_table(result["summary"]))
    if benchmark is not None:
        result["summary"]["benchmark"] = benchmark
        result["summary"]["breakdown"] = breakdowns(records, result["problems"], BENCHMARKS[benchmark].breakdown)
        if result["summary"]["breakdown"]:
            print(breakdown_table(result["summary"]["breakdown"]))
    if out:
        print(f"wrote {write_results(out, result)}")
    return 0


def _nan(x: Optional[float]) -> float:
    return math.nan if x is None else float(x)


def _problem_row(record, samples: list[dict], greedy: Optional[dict], fmt: str) -> dict:
    acc = [_nan(s["accuracy"]) for s in samples]
    answers = [extract_final_answer(s["completion"])[0] for s in samples]
    same = equivalent_answers if record.task == "math" else (lambda x, y: x == y)
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
    keys = SUMMARY_KEYS
    heads = ("pass@1", f"cons@{summary['samples']}", "greedy", "format", "language", "mixing", "length")
    head = f"{'model':<40} " + " ".join(f"{h:>9}" for h in heads)
    name = summary["model"] if len(summary["model"]) <= 40 else "..." + summary["model"][-37:]
    cells = " ".join(f"{'n/a':>9}" if math.isnan(summary[k]) else f"{summary[k]:>9.3f}" if k != "response_length_mean"
                     else f"{summary[k]:>9.1f}" for k in keys)
    return (f"{summary['problems']} problems x {summary['samples']} samples at T {summary['temperature']}, "
            f"top-p {summary['top_p']}{' (+ greedy)' if summary['greedy'] else ''}, {summary['seconds']:.0f}s\n{head}\n{'-' * len(head)}\n{name:<40} {cells}")


__all__ = ["EvalError", "EvalSettings", "SUMMARY_KEYS", "eval_command", "evaluate_model", "evaluate_prompts", "fit_eval_problems", "load_eval_problems", "summary_table",
           "write_results"]
