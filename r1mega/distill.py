"""``r1mega distill``: DeepSeek-R1's distillation, SFT of a small dense student on a teacher's
rejection-sampled reasoning traces (no RL).

    teacher --rejection sampling--> traces.jsonl --SFT--> student/final
    held-out evaluation of the student base, the distilled student and the teacher

1. ``traces.jsonl`` (+ ``traces.jsonl.report.json``): k completions of the teacher per training
   prompt (:func:`r1mega.rejection.rejection_sample`), kept when verified correct, in format,
   readable and language-consistent, at most m per prompt; rows carry their provenance.
2. ``student/``: an ``r1mega sft`` run (recipe ``tiny-cold-start`` unless another config is given)
   of the student on those rows; ``student/final`` is the distilled student (a Hugging Face
   directory).
3. ``eval/<role>/``: ``r1mega eval`` of the student base, the distilled student and the teacher on
   the held-out problems (pass@1, cons@k, greedy accuracy, format, language consistency, mixing).
4. ``distill.json``: the inputs, the settings, the three rows of figures and the seconds of each
   phase, rewritten atomically after every phase (``complete`` is true at the end).

The default student is the embedded dense one (:func:`r1mega.run.base_model.ensure_student_base`:
a Llama-3 architecture smaller than the MoE teacher, on the same corpus, hence the same
tokenizer). The default data are the embedded R1 corpus's additions (English and Chinese), in the
R1-Zero prompt template with R1's output format (think block, then a summary with the boxed
answer: ``format_style="summary"``).

Resumable at phase granularity: a call with the same inputs and settings reuses every phase whose
output is complete (an interrupted SFT run is resumed from its last checkpoint); other inputs or
settings in an existing ``out_dir`` are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from r1mega.config import Config, ConfigError, DataConfig
from r1mega.data import DataError, r1_corpus
from r1mega.evaluation import EvalSettings, evaluate_model, load_eval_problems, write_results
from r1mega.evaluation.prompt_fit import fit_to_model
from r1mega.models import describe_hf_model
from r1mega.models.hf_checkpoint import check_hf_checkpoint
from r1mega.recipes import get_recipe
from r1mega.rejection import FilterSettings, rejection_sample, report_path
from r1mega.run.base_model import STUDENT_SPEC, ensure_student_base
from r1mega.sft.data import load_sft_data
from r1mega.sft.loop import sft
from r1mega.utils.io import atomic_write_text

ROLES = ("student_base", "student", "teacher")
ROLE_NAMES = {"student_base": "student base", "student": "student (distilled)", "teacher": "teacher"}
METRICS = ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate", "mixing_rate",
           "response_length_mean")
TRACES = "traces.jsonl"
STUDENT_RUN = "student"
RESULT = "distill.json"
# Keys of the SFT config distill sets itself.
OWN_KEYS = ("run.model", "sft.data", "run.out_dir", "run.name")
# The embedded default's prompts: the whole train split (3670 additions: ~1370 traces from the
# cold-start teacher; 600 prompts gave ~230, too few for the student to learn the R1 format, held-out
# pass@1 0.000) and the first 100 held-out problems.
DEFAULT_PROMPTS, DEFAULT_HELDOUT = None, 100
STUDENT_NOT_BETTER = 3  # r1mega distill's exit status when the result is written but the student does not beat its base
# the prompt budget distill's sampling and evaluation run with (EvalSettings' and rejection_sample's)
DEFAULT_MAX_PROMPT_TOKENS = EvalSettings().max_prompt_tokens

Problems = Union[str, Path, Sequence, None]


class DistillError(ValueError):
    """Bad distillation input, found before any work (or a phase that produced nothing); one line."""


@dataclass(frozen=True)
class DistillSettings:
    """How the teacher is sampled, the traces filtered and the three models evaluated."""

    samples: int = 4  # teacher completions per training prompt
    max_per_prompt: int = 2  # most traces kept per prompt
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 96  # of a teacher completion (the tiny models answer in ~40 tokens)
    template: str = "r1_zero"
    format_style: str = "summary"  # R1's output format; "answer-tags" for R1-Zero's
    min_language: float = 0.95  # language consistency a kept trace needs where the prompt names one
    eval_samples: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_max_new_tokens: int = 96
    eval_greedy: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise DistillError(f"--samples: {self.samples} must be >= 1")
        if self.max_per_prompt < 1:
            raise DistillError(f"--max-per-prompt: {self.max_per_prompt} must be >= 1")
        # the checks of the sampling settings that eval and sample make
        self.sample_settings()
        self.eval_settings()

    def sample_settings(self):
        return EvalSettings(samples=self.samples, temperature=self.temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, template=self.template,
                            format_style=self.format_style, seed=self.seed)

    def eval_settings(self):
        return EvalSettings(samples=self.eval_samples, temperature=self.eval_temperature, top_p=self.eval_top_p,
                            max_new_tokens=self.eval_max_new_tokens, template=self.template,
                            format_style=self.format_style, greedy=self.eval_greedy, seed=self.seed)

    def filters(self):
        return FilterSettings(min_language=self.min_language, max_per_prompt=self.max_per_prompt)


def settings_from_config(cfg) -> DistillSettings:
    """DistillSettings of a config: the teacher's sampling and the filters from cfg.distill, the
    held-out evaluation from cfg.eval (its max_new_tokens, None: distill.max_new_tokens), the
    prompt template run.template and the seed run.seed."""
    d, e = cfg.distill, cfg.eval
    return DistillSettings(samples=d.samples, max_per_prompt=d.max_per_prompt, temperature=d.temperature, top_p=d.top_p,
                           max_new_tokens=d.max_new_tokens, template=cfg.run.template, format_style=d.format_style,
                           min_language=d.min_language, eval_samples=e.samples, eval_temperature=e.temperature,
                           eval_top_p=e.top_p, eval_max_new_tokens=e.max_new_tokens or d.max_new_tokens,
                           eval_greedy=e.greedy, seed=cfg.run.seed)


def distill_command(cfg, *, teacher: str | Path, out: str | Path, student: Optional[str | Path] = None,
                    data: Optional[str | Path] = None, heldout: Optional[str | Path] = None,
                    traces: Optional[str | Path] = None, progress: bool = True) -> int:
    """``r1mega distill``: `cfg` is the student's SFT config and holds distill's settings
    (:func:`settings_from_config`); the models and files are the command line's. Prints the table."""
    for key, value in (("run.model", cfg.run.model), ("sft.data", cfg.sft.data)):
        if value is not None:
            raise DistillError(f"--set {key}: distill sets it itself (from --student, the traces and --out)")
    doc = distill(teacher, out_dir=out, student_dir=student, data=data, heldout=heldout,
                  max_prompts=cfg.distill.max_prompts, max_heldout=cfg.distill.max_heldout,
                  settings=settings_from_config(cfg), sft_config=cfg, traces=traces, data_config=cfg.data,
                  progress=progress)
    print(result_table(doc))
    print(f"wrote {Path(out) / RESULT}")
    rows = {row["role"]: row for row in doc["results"]}
    student, base = (rows.get(r, {}).get("pass_at_1") for r in ("student", "student_base"))
    if student is not None and base is not None and not student > base:  # NaN counts as not beating it
        print(f"r1mega: error: the distilled student does not beat its own base on held-out pass@1 ({_fmt(student, 3)} "
              f"vs {_fmt(base, 3)}; {Path(out) / RESULT})", file=sys.stderr)
        return STUDENT_NOT_BETTER
    return 0


def _load_problems(source: Problems, limit: Optional[int], split: str, default_n: int, flag: str,
                   data_config: Optional[DataConfig] = None):
    """(records, a description) of a problems file (read as `data_config` says), a sequence of
    records, or (None) the embedded R1 corpus's `split`."""
    if source is None:
        records = r1_corpus.problems(split, limit if limit is not None else default_n, seed=0)
        return records, f"r1mega.data.r1_corpus.problems({split!r}, {len(records)})"
    if isinstance(source, (str, Path)):
        try:
            records = load_eval_problems(source, limit, data=data_config)
        except ValueError as err:
            raise DistillError(f"{flag}: {err}") from None
        return records, str(Path(source).resolve())
    records = list(source)[:limit] if limit is not None else list(source)
    return records, f"{len(records)} records given in Python"


def _digest(records: Sequence) -> str:
    text = json.dumps([[r.id, r.prompt, r.task, r.answer, r.language] for r in records], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_model(path: Path, flag: str) -> dict:
    """What distill records of a model directory; DistillError if the megatron policy cannot load it."""
    if not (path / "config.json").is_file():
        raise DistillError(f"{flag}: {str(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        desc = describe_hf_model(path)
        tensors, _ = check_hf_checkpoint(path, desc)
    except ValueError as err:
        raise DistillError(f"{flag}: {err}") from None
    params = sum(math.prod(t.shape) for t in tensors.values())
    return {"path": str(path.resolve()), "arch": desc.arch, "layers": desc.num_layers, "hidden": desc.hidden_size,
            "moe": desc.is_moe, "parameters": params}


def same_vocabulary(a: str | Path, b: str | Path) -> bool:
    """Whether two model directories' tokenizers map the same strings to the same ids."""
    import transformers

    ta = transformers.AutoTokenizer.from_pretrained(str(a))
    tb = transformers.AutoTokenizer.from_pretrained(str(b))
    return ta.get_vocab() == tb.get_vocab() and ta.all_special_tokens == tb.all_special_tokens


def _sft_config(base, student: Path, traces: Path, out_dir: Path, overrides):
    """The student's SFT config: `base` (default: the recipe tiny-cold-start), then `overrides`
    ({"section.field": value} or "section.field=value" strings, as --set gives them), then
    distill's own keys."""
    cfg = base if base is not None else get_recipe("tiny-cold-start")
    if not isinstance(cfg, Config):
        raise DistillError(f"sft_config: expected an r1mega Config, got {type(cfg).__name__}")
    strings = not isinstance(overrides, Mapping)
    keys = [text.partition("=")[0].strip() for text in overrides] if strings else list(overrides)
    for key in keys:
        if key in OWN_KEYS:
            raise DistillError(f"--set {key}: distill sets it itself (from --student, the traces and --out)")
    try:
        if overrides:
            cfg = cfg.with_overrides(list(overrides)) if strings else cfg.with_values(dict(overrides))
        return cfg.with_values({"run.model": str(student), "sft.data": str(traces), "run.out_dir": str(out_dir),
                                "run.name": STUDENT_RUN})
    except ConfigError as err:
        raise DistillError(str(err)) from None


def _traces_complete(traces: Path) -> Optional[dict]:
    report = report_path(traces)
    if not (traces.is_file() and report.is_file()):
        return None
    data = json.loads(report.read_text())
    lines = sum(1 for line in traces.read_text(encoding="utf-8").splitlines() if line.strip())
    return data if data.get("kept") == lines else None


def _read_eval(path: Path) -> Optional[dict]:
    file = path / "summary.json"
    if not file.is_file():
        return None
    return {k: (math.nan if v is None else v) for k, v in json.loads(file.read_text()).items()}


def _json(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    return x


def _note(progress: bool, text: str) -> None:
    if progress:
        sys.stderr.write(f"distill: {text}\n")
        sys.stderr.flush()


def distill(teacher_dir: str | Path, *, out_dir: str | Path, student_dir: Optional[str | Path] = None,
            data: Problems = None, heldout: Problems = None, max_prompts: Optional[int] = None,
            max_heldout: Optional[int] = None, settings: DistillSettings = DistillSettings(),
            sft_config=None, sft_overrides: Union[Mapping[str, Any], Sequence[str]] = (),
            cache: Optional[str | Path] = None, traces: Optional[str | Path] = None,
            data_config: Optional[DataConfig] = None, progress: bool = True) -> dict:
    """Distil `teacher_dir` into the student (default: the embedded dense student base) under
    `out_dir`; returns what distill.json holds.

    data / heldout: a problems file (r1mega.data rows with gold answers), a sequence of
    PromptRecords, or None: the embedded R1 corpus's train split (first `max_prompts`, default
    all 3670) / test split (first `max_heldout`, default 100). sft_config: the SFT Config (default: the
    recipe tiny-cold-start); sft_overrides: {"section.field": value} or "section.field=value"
    strings applied over it. run.model,
    sft.data, run.out_dir and run.name are distill's (the student, the traces, out_dir, "student").
    traces: SFT rows already rejection-sampled from the teacher (``r1mega sample``'s output, or
    DeepSeek-R1's way: the data curated for stage 3, which the paper's students were trained on);
    the sampling phase is skipped and `data` must be None.
    data_config: how the problems files are read (format, columns) and what happens to prompts too
    long for the teacher (data.overlong_prompts); default: r1mega rows, overlong ones refused.
    """
    wall = time.perf_counter()
    out_dir = Path(out_dir)
    teacher = Path(teacher_dir)
    if not isinstance(settings, DistillSettings):
        raise DistillError(f"settings: expected DistillSettings, got {type(settings).__name__}")
    # Everything checked before any work: the models, the data, the SFT config.
    teacher_info = _check_model(teacher, "--teacher")
    if student_dir is not None:
        student = Path(student_dir)
        student_info = _check_model(student, "--student")
    data_config = data_config or DataConfig()
    train_records, train_source = _load_problems(data, max_prompts, "train", DEFAULT_PROMPTS, "--data", data_config)
    heldout_records, heldout_source = _load_problems(heldout, max_heldout, "test", DEFAULT_HELDOUT, "--heldout",
                                                     data_config)
    try:  # the prompts against the teacher's budget, before any model is built
        train_records, heldout_records = fit_to_model(
            teacher, (data or "the embedded R1 corpus", train_records, "distill.max_new_tokens", settings.max_new_tokens),
            (heldout or "the embedded R1 test split", heldout_records, "eval.max_new_tokens", settings.eval_max_new_tokens),
            template=settings.template, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS, overlong=data_config.overlong_prompts)
    except DataError as err:
        raise DistillError(str(err)) from None
    for records, flag in ((train_records, "--data"), (heldout_records, "--heldout")):
        if not records:
            raise DistillError(f"{flag}: no problems")
    given_traces = None if traces is None else Path(traces)
    if given_traces is not None:
        if data is not None:
            raise DistillError("--traces: the traces are given, so there are no prompts to sample (drop --data)")
        try:
            given_rows = len(load_sft_data(given_traces))
        except DataError as err:
            raise DistillError(str(err)) from None
    traces = given_traces or out_dir / TRACES
    _sft_config(sft_config, Path("student"), traces, out_dir, sft_overrides)  # refuse bad keys now

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if student_dir is None:
        student = ensure_student_base(cache, progress=progress)
        student_info = {**_check_model(student, "--student"), "spec": asdict(STUDENT_SPEC)}
    pretrain_json = student / "pretrain.json"
    if pretrain_json.is_file():
        student_info["pretrain_seconds"] = json.loads(pretrain_json.read_text()).get("seconds")
    seconds["student_base"] = time.perf_counter() - clock
    cfg = _sft_config(sft_config, student, traces, out_dir, sft_overrides)
    vocab = same_vocabulary(teacher, student)
    if not vocab:
        _note(progress, "the student's tokenizer differs from the teacher's (fine for SFT on text; logit "
                        "distillation would need the same vocabulary)")

    inputs = {"teacher": teacher_info, "student": student_info, "same_vocabulary": vocab,
              "data": ({"source": train_source, "prompts": len(train_records), "sha256": _digest(train_records)}
                       if given_traces is None else {"traces": str(given_traces.resolve()), "rows": given_rows,
                                                     "sha256": hashlib.sha256(given_traces.read_bytes()).hexdigest()}),
              "heldout": {"source": heldout_source, "problems": len(heldout_records),
                          "sha256": _digest(heldout_records)}}
    # what a resumed call must share with the first one
    plan = {"inputs": {**inputs, "student": {k: v for k, v in student_info.items() if k != "pretrain_seconds"}},
            "settings": asdict(settings), "sft": cfg.to_dict()}
    result_path = out_dir / RESULT
    previous = json.loads(result_path.read_text()) if result_path.is_file() else None
    if previous is not None:
        for key in ("inputs", "settings", "sft"):
            if previous.get("plan", {}).get(key) != _json(plan[key]):
                raise DistillError(f"{out_dir}: holds a distillation with other {key} (see {result_path}); "
                                   "use another --out")
    rows: dict[str, dict] = {}
    reused: list[str] = []
    earlier = (previous or {}).get("seconds", {})

    def took(phase: str, clock: float) -> float:
        """The seconds of the work that made the phase's output: this call's, or the earlier call's
        when it was reused."""
        if phase in reused and earlier.get(phase) is not None:
            return earlier[phase]
        return time.perf_counter() - clock

    def save(complete: bool) -> dict:
        doc = {"complete": complete, "plan": plan, "inputs": inputs, "settings": asdict(settings),
               "student_base": str(student.resolve()),
               "student_final": str(final.resolve()) if (final / "config.json").is_file() else None,
               "traces": trace_info, "sft": sft_info, "results": [rows[r] for r in ROLES if r in rows],
               "seconds": {**seconds, "total": sum(seconds.values()), "this_call": time.perf_counter() - wall},
               "reused": reused}
        atomic_write_text(result_path, json.dumps(_json(doc), indent=2, ensure_ascii=False) + "\n")
        return doc

    trace_info: dict = {}
    sft_info: dict = {}
    final = cfg.run.run_dir / "final"
    out_dir.mkdir(parents=True, exist_ok=True)
    save(False)

    # 1. rejection sampling of the teacher
    clock = time.perf_counter()
    report = _traces_complete(traces) if given_traces is None else {"kept": given_rows}
    if given_traces is not None:
        _note(progress, f"traces: {given_rows} rows given ({given_traces})")
    elif report is not None:
        reused.append("traces")
        _note(progress, f"traces: reusing {traces} ({report['kept']} rows)")
    else:
        _note(progress, f"traces: {settings.samples} samples of the teacher for each of {len(train_records)} prompts")
        s = settings
        report = rejection_sample(teacher, train_records, traces, samples=s.samples, temperature=s.temperature,
                                  top_p=s.top_p, max_new_tokens=s.max_new_tokens, template=s.template,
                                  format_style=s.format_style, filters=settings.filters(), seed=s.seed,
                                  progress=progress)
    if given_traces is not None:
        trace_info = {"path": str(given_traces.resolve()), "kept": given_rows, "given": True}
        samples = None
    else:
        samples = sum(t["samples"] for t in report["tasks"].values())
        trace_info = {"path": str(traces.resolve()), "kept": report["kept"], "samples": samples,
                      "acceptance_rate": report["kept"] / max(samples, 1),
                      "prompts_with_kept": sum(t["prompts_with_kept"] for t in report["tasks"].values()),
                      "rejected": _sum_rejected(report), "sampling_seconds": report["seconds"]}
    seconds["traces"] = took("traces", clock)
    save(False)
    if report["kept"] == 0 and given_traces is None:
        raise DistillError(f"rejection sampling kept none of the teacher's {samples} completions (rejected: "
                           f"{trace_info['rejected']}); is --format-style {settings.format_style} the format "
                           "the teacher writes?")

    # 2. SFT of the student on the traces
    clock = time.perf_counter()
    run_dir = cfg.run.run_dir
    if (run_dir / "summary.json").is_file() and (final / "config.json").is_file():
        reused.append("sft")
        summary = json.loads((run_dir / "summary.json").read_text())
        _note(progress, f"sft: reusing {final}")
    else:
        resume = run_dir if (run_dir / "config.json").is_file() else None
        _note(progress, f"sft: the student on {report['kept']} traces" + (f" (resuming {run_dir})" if resume else ""))
        summary = sft(cfg, resume=resume, progress=progress)
    sft_info = {"run_dir": str(run_dir.resolve()), "final": str(final.resolve()), **{
        k: summary.get(k) for k in ("examples", "steps", "epochs", "loss_first", "loss_last", "train_seconds")}}
    seconds["sft"] = took("sft", clock)
    save(False)

    # 3. held-out evaluation of the three models
    eval_settings = settings.eval_settings()
    for role, model in (("student_base", student), ("student", final), ("teacher", teacher)):
        clock = time.perf_counter()
        where = out_dir / "eval" / role
        summary = _read_eval(where)
        if summary is not None:
            reused.append(f"eval_{role}")
        else:
            _note(progress, f"eval: {ROLE_NAMES[role]} on {len(heldout_records)} held-out problems")
            result = evaluate_model(model, heldout_records, eval_settings, progress=progress)
            write_results(where, result)
            summary = result["summary"]
        rows[role] = {"role": role, "model": str(Path(model).resolve()), **{k: summary[k] for k in METRICS},
                      "eval_seconds": summary["seconds"]}
        seconds[f"eval_{role}"] = took(f"eval_{role}", clock)
        save(False)
    doc = save(True)
    if progress:
        sys.stderr.write(f"distill: wrote {result_path}\n")
    return doc


def _sum_rejected(report: dict) -> dict:
    total: dict[str, int] = {}
    for t in report["tasks"].values():
        for reason, n in t["rejected"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def result_table(doc: dict) -> str:
    """The three rows of a distill.json, and where the time went."""
    inputs, traces, sft = doc["inputs"], doc["traces"], doc["sft"]
    t, s = inputs["teacher"], inputs["student"]
    k = doc["settings"]["eval_samples"]
    where = (f"{traces['kept']} traces given ({traces['path']})" if traces.get("given") else
             f"{traces['kept']} traces kept of {traces['samples']} samples ({traces['acceptance_rate']:.3f}) on "
             f"{inputs['data']['prompts']} prompts")
    lines = [f"teacher {t['arch']} ({t['parameters']:,} parameters) -> student {s['arch']} ({s['parameters']:,}); "
             f"{where}; SFT {sft['steps']} steps, loss {_fmt(sft['loss_first'], 3)} -> {_fmt(sft['loss_last'], 3)}",
             f"held-out: {inputs['heldout']['problems']} problems x {k} samples "
             f"(format {doc['settings']['format_style']})"]
    heads = ("pass@1", f"cons@{k}", "greedy", "format", "language", "mixing", "length")
    head = f"{'model':<20} " + " ".join(f"{h:>9}" for h in heads)
    lines += [head, "-" * len(head)]
    for row in doc["results"]:
        cells = " ".join(f"{_fmt(row[m], 1 if m == 'response_length_mean' else 3):>9}" for m in METRICS)
        lines.append(f"{ROLE_NAMES[row['role']]:<20} {cells}")
    sec = doc["seconds"]
    lines.append("seconds: " + ", ".join(f"{name} {v:.0f}" for name, v in sec.items())
                 + (f" (reused: {', '.join(doc['reused'])})" if doc["reused"] else ""))
    return "\n".join(lines)


def _fmt(x: Optional[float], digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


__all__ = ["DistillError", "DistillSettings", "distill", "distill_command", "result_table", "same_vocabulary",
           "settings_from_config"]
