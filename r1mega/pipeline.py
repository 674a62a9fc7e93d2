"""``r1mega pipeline``: the whole DeepSeek-R1 recipe in one command, on the embedded default.

Stages (recipe ``r1``), each an ordinary r1mega command run as its own process, each writing a
Hugging Face directory and an entry in ``OUT/manifest.json`` (command, inputs, config, figures,
wall time):

1. ``cold_start``: SFT of the base model on the cold-start set (recipe tiny-cold-start).
2. ``reasoning_rl``: GRPO from the cold start, accuracy + format + language consistency
   (tiny-reasoning-rl); ``reasoning_rl_no_language`` is the same run without the language
   reward, the ablation that shows what the reward does to language mixing.
3. ``rejection_sampling``: ``r1mega sample`` of the stage-2 model on the training prompts
   (verified, readable, one per prompt) plus the general prompts' answers; ``sft_general``:
   SFT of the *base* model on them (tiny-rejection-sft).
   ``reward_model``: ``r1mega rm`` on the general prompts' preference pairs.
4. ``all_scenario_rl``: GRPO from stage 3 on additions and general prompts, the rule rewards for
   the first and the reward model for the second (tiny-all-scenario-rl).
5. ``distill``: ``r1mega distill`` into the dense student on stage 3's data (as the paper's
   students: the stage-2 checkpoint's verified samples and the general answers).

Every model is then evaluated on the same held-out problems (R1's protocol: 4 samples at T 0.6,
top-p 0.95, and greedy; recipe tiny-r1-eval), and one table compares base, each stage and the student.

Each stage's settings are a named recipe (:data:`STAGE_RECIPES`, ``r1mega recipes``); the
pipeline's own config (recipe ``r1``) is its ``pipeline`` section: the output directory and the
data sizes.

Resumable by stage: a stage recorded done in the manifest (and whose outputs exist) is not
redone; a stage that was killed resumes from its run directory's last checkpoint. Each stage is
recorded with a fingerprint of its settings and its inputs' fingerprints (:func:`stage_fingerprints`):
one whose recipe, sizes or base changed since is redone from scratch, with every stage that reads it
and every evaluation of them, so that a run directory never mixes stages made under other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from r1mega.config import Config, PipelineConfig
from r1mega.data import r1_corpus
from r1mega.data.loader import write_prompts
from r1mega.evaluation.metrics import paired_difference
from r1mega.recipes import get_recipe
from r1mega.rejection.sample import report_path
from r1mega.run.base_model import ensure_base_model, spec_from_config
from r1mega.run.rundir import resolve_model
from r1mega.sft.data import load_sft_data, write_sft_rows
from r1mega.utils.io import atomic_write_text

MANIFEST = "manifest.json"
# the pipeline section's defaults (recipe r1)
HELDOUT_PROBLEMS = PipelineConfig().heldout_problems
SAMPLE_PROMPTS = PipelineConfig().sample_prompts  # stage-2 training prompts rejection-sampled for stage 3 (and the student)
MIX_MATH_PROMPTS = PipelineConfig().mix_math_prompts  # additions in stage 4's mixed prompt set, next to every general prompt
# Each stage's settings: a named recipe (r1mega.recipes). "eval" is every model's held-out evaluation.
STAGE_RECIPES = {
    "cold_start": "tiny-cold-start",
    "reasoning_rl": "tiny-reasoning-rl",
    "reasoning_rl_no_language": "tiny-reasoning-rl-no-language",
    "rejection_sampling": "tiny-rejection-sampling",
    "sft_general": "tiny-rejection-sft",
    "reward_model": "tiny-reward-model",
    "all_scenario_rl": "tiny-all-scenario-rl",
    "distill": "tiny-distill",
    "eval": "tiny-r1-eval",
}


class PipelineError(RuntimeError):
    """A stage failed; the message names it, its command and its log."""


@dataclass
class Context:
    out: Path
    python: str
    progress: bool
    manifest: dict
    cfg: Config = field(default_factory=lambda: get_recipe("r1"))  # the pipeline section: sizes

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def save(self) -> None:
        atomic_write_text(self.path(MANIFEST), json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")


def r1mega_command(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, "-m", "r1mega", *args]


def run_command(ctx: Context, stage: str, argv: list[str], *, ok: tuple[int, ...] = (0,)) -> float:
    """Run one stage's command, its output into OUT/logs/STAGE.log (and the progress line on
    stderr); returns the wall time. An exit status not in `ok` raises PipelineError naming the log."""
    log = ctx.path("logs", f"{stage}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode not in ok:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise PipelineError(f"stage {stage} failed (exit {proc.returncode}): {tail[0]} (log: {log}; run "
                            f"`r1mega pipeline --out {ctx.out}` again to resume)")
    return time.perf_counter() - start


def _eval(ctx: Context, name: str, model: Path, fingerprint: Optional[str] = None) -> dict:
    """Held-out figures of `model` (cached in OUT/eval/NAME/summary.json, and redone when the
    manifest records another fingerprint for it: eval_fingerprint)."""
    out = ctx.path("eval", name)
    summary = out / "summary.json"
    evals = ctx.manifest.setdefault("evals", {})
    if fingerprint is not None and evals.get(name) != fingerprint:
        shutil.rmtree(out, ignore_errors=True)
    if not summary.is_file():
        e = get_recipe(STAGE_RECIPES["eval"])
        protocol = ["--samples", str(e.eval.samples), "--temperature", str(e.eval.temperature),
                    "--top-p", str(e.eval.top_p), "--max-new-tokens", str(e.eval.new_tokens(e.rollout)),
                    "--template", e.run.template, "--format-style", e.rewards.format_style,
                    *([] if e.eval.greedy else ["--no-greedy"])]
        run_command(ctx, f"eval-{name}", r1mega_command(
            ctx, "eval", "--model", str(model), "--data", str(ctx.path("data", "heldout.jsonl")), "--out", str(out),
            *protocol, "--quiet"))
    if fingerprint is not None:
        evals[name] = fingerprint
        ctx.save()
    s = json.loads(summary.read_text())
    return {k: s[k] for k in ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate",
                              "mixing_rate", "response_length_mean")}


def paired_gap(ctx: Context, name: str, than: str) -> Optional[tuple[float, float]]:
    """Held-out pass@1 of eval NAME minus that of eval THAN over the problems both scored, with
    its paired standard error; None when either evaluation has no per-problem results."""
    per_problem = []
    for n in (name, than):
        path = ctx.path("eval", n, "problems.jsonl")
        if not path.is_file():
            return None
        rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        per_problem.append({r["id"]: r["pass_at_1"] for r in rows})
    ids = [i for i in per_problem[0] if i in per_problem[1]]
    return paired_difference([per_problem[0][i] for i in ids], [per_problem[1][i] for i in ids])


def run_dir_command(ctx: Context, stage: str, command: str, recipe: str, run_dir: Path, args: list[str]) -> list[str]:
    """`r1mega train|sft` for a stage, resuming its run directory when a killed attempt left one."""
    if (run_dir / "config.json").is_file() and not (run_dir / "summary.json").is_file():
        return r1mega_command(ctx, command, "--resume", str(run_dir), "--quiet")
    if (run_dir / "config.json").is_file():  # finished but not recorded: redo from scratch
        shutil.rmtree(run_dir)
    return r1mega_command(ctx, command, "--recipe", recipe, *args, "--set", f"run.out_dir={run_dir.parent}",
                          "--set", f"run.name={run_dir.name}", "--quiet")


# ---- the stages ---------------------------------------------------------------------------------
def stage_data(ctx: Context) -> dict:
    p = ctx.cfg.pipeline
    train = r1_corpus.problems("train")
    write_prompts(ctx.path("data", "train.jsonl"), train)
    write_prompts(ctx.path("data", "heldout.jsonl"), r1_corpus.problems("test", p.heldout_problems))
    write_prompts(ctx.path("data", "sample_prompts.jsonl"), train[:p.sample_prompts])
    general = r1_corpus.general_prompts("train")
    write_prompts(ctx.path("data", "mixed.jsonl"), _interleave(train[:p.mix_math_prompts], general))
    return {"outputs": {n: str(ctx.path("data", f"{n}.jsonl")) for n in ("train", "heldout", "sample_prompts", "mixed")},
            "figures": {"train_problems": len(train), "heldout_problems": p.heldout_problems,
                        "general_prompts": len(general)}}


def _interleave(a: list, b: list) -> list:
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        # keep the two tasks spread evenly through the file (the sampler shuffles, but a
        # reader of the file sees the mix)
        if j >= len(b) or (i < len(a) and i * len(b) <= j * len(a)):
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out


def stage_base(ctx: Context) -> dict:
    if ctx.cfg.pipeline.base_model is None:
        hf_dir = ensure_base_model(spec=spec_from_config(ctx.cfg), progress=ctx.progress)
    else:
        _, hf_dir = resolve_model(ctx.cfg.pipeline.base_model)
    return {"model": str(hf_dir), "figures": {}}


def base_model(ctx: Context) -> str:
    return ctx.manifest["stages"]["base"]["model"]


def _sft_stage(name: str, *, model: Callable[[Context], Optional[str]],
               data: Callable[[Context], Optional[str]]) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        run_dir = ctx.path("runs", name)
        args = []
        if (m := model(ctx)) is not None:
            args += ["--model", m]
        if (d := data(ctx)) is not None:
            args += ["--data", d]
        argv = run_dir_command(ctx, name, "sft", STAGE_RECIPES[name], run_dir, args)
        wall = run_command(ctx, name, argv)
        summary = json.loads((run_dir / "summary.json").read_text())
        return {"command": shlex.join(argv), "model": str(run_dir / "final"), "run_dir": str(run_dir),
                "config": str(run_dir / "config.json"), "wall_s": wall,
                "figures": {k: summary[k] for k in ("examples", "steps", "loss_first", "loss_last")}}
    return run


def _rl_stage(name: str, *, model: Callable[[Context], str], data: str,
              extra: Callable[[Context], list[str]] = lambda ctx: []) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        run_dir = ctx.path("runs", name)
        args = ["--model", model(ctx), "--data", str(ctx.path("data", data)),
                "--heldout", str(ctx.path("data", "heldout.jsonl")), *extra(ctx)]
        argv = run_dir_command(ctx, name, "train", STAGE_RECIPES[name], run_dir, args)
        wall = run_command(ctx, name, argv)
        summary = json.loads((run_dir / "summary.json").read_text())
        return {"command": shlex.join(argv), "model": str(run_dir / "final"), "run_dir": str(run_dir),
                "config": str(run_dir / "config.json"), "wall_s": wall,
                "figures": {k: summary.get(k) for k in ("steps", "heldout_accuracy_before", "heldout_accuracy_after",
                                                        "format_rate_after", "response_length_after")}}
    return run


def stage_rejection_sampling(ctx: Context) -> dict:
    reasoning = ctx.path("data", "stage2_samples.jsonl")
    argv = r1mega_command(ctx, "sample", "--recipe", STAGE_RECIPES["rejection_sampling"],
                          "--model", ctx.manifest["stages"]["reasoning_rl"]["model"],
                          "--data", str(ctx.path("data", "sample_prompts.jsonl")), "--out", str(reasoning), "--quiet")
    wall = run_command(ctx, "rejection_sampling", argv)
    report = json.loads(report_path(reasoning).read_text())
    rows = [json.loads(line) for line in reasoning.read_text().splitlines() if line.strip()]
    general = r1_corpus.general_sft_rows(r1_corpus.general_prompts("train"))
    data = ctx.path("data", "stage3_sft.jsonl")
    write_sft_rows(data, rows + general)
    load_sft_data(data)  # the file stage 3 reads is valid
    return {"command": shlex.join(argv), "outputs": {"samples": str(reasoning), "sft_data": str(data)},
            "wall_s": wall, "figures": {"reasoning_rows": len(rows), "general_rows": len(general),
                                        "acceptance": _acceptance(report)}}


def _acceptance(report: dict) -> Optional[float]:
    tasks = report.get("tasks") or {}
    samples = sum(t.get("samples", 0) for t in tasks.values())
    kept = sum(t.get("kept", 0) for t in tasks.values())
    return kept / samples if samples else None


def stage_reward_model(ctx: Context) -> dict:
    out = ctx.path("reward_model")
    # from the pipeline's base, as every stage (DeepSeek-R1's reward models start from its base, V3)
    argv = r1mega_command(ctx, "rm", "--recipe", STAGE_RECIPES["reward_model"], "--model", base_model(ctx),
                          "--out", str(out), "--quiet")
    wall = run_command(ctx, "reward_model", argv)
    metrics = json.loads((out / "rm.json").read_text())["metrics"]
    return {"command": shlex.join(argv), "model": str(out), "wall_s": wall,
            "figures": {"heldout_accuracy_before": metrics["heldout_acc_before"],
                        "heldout_accuracy": metrics["heldout_acc"], "train_accuracy": metrics["train_acc"]}}


def stage_distill(ctx: Context) -> dict:
    out = ctx.path("runs", "distill")
    # DeepSeek-R1's students learn from the data curated for stage 3 (rejection-sampled from the
    # stage-2 checkpoint, plus the general answers), not from fresh samples: the same here.
    argv = r1mega_command(ctx, "distill", "--recipe", STAGE_RECIPES["distill"], "--teacher", ctx.manifest["stages"]["reasoning_rl"]["model"],
                          "--traces", ctx.manifest["stages"]["rejection_sampling"]["outputs"]["sft_data"],
                          "--heldout", str(ctx.path("data", "heldout.jsonl")), "--out", str(out), "--quiet")
    # exit 3: distill.json is written but the student does not beat its base, one of the claims the
    # pipeline's table checks (and the pipeline's exit status reports) itself
    wall = run_command(ctx, "distill", argv, ok=(0, 3))
    info = json.loads((out / "distill.json").read_text())
    return {"command": shlex.join(argv), "model": info["student_final"], "student_base": info["student_base"],
            "wall_s": wall, "figures": {"traces": info["traces"]["kept"], "sft_steps": info["sft"]["steps"]}}


STAGES: dict[str, Callable[[Context], dict]] = {
    "data": stage_data,
    "base": stage_base,
    "cold_start": _sft_stage("cold_start", model=base_model, data=lambda ctx: None),
    "reasoning_rl": _rl_stage("reasoning_rl", data="train.jsonl",
                              model=lambda ctx: ctx.manifest["stages"]["cold_start"]["model"]),
    "reasoning_rl_no_language": _rl_stage(
        "reasoning_rl_no_language", data="train.jsonl",
        model=lambda ctx: ctx.manifest["stages"]["cold_start"]["model"]),
    "rejection_sampling": stage_rejection_sampling,
    "sft_general": _sft_stage("sft_general", model=base_model,
                              data=lambda ctx: ctx.manifest["stages"]["rejection_sampling"]["outputs"]["sft_data"]),
    "reward_model": stage_reward_model,
    "all_scenario_rl": _rl_stage(
        "all_scenario_rl", data="mixed.jsonl",
        model=lambda ctx: ctx.manifest["stages"]["sft_general"]["model"],
        extra=lambda ctx: ["--set", f"rewards.reward_model={ctx.manifest['stages']['reward_model']['model']}"]),
    "distill": stage_distill,
}

# the table's rows: (label, stage whose model is evaluated, manifest key of the model)
ROWS = (("base", "base", "model"), ("1 cold start", "cold_start", "model"),
        ("2 reasoning RL", "reasoning_rl", "model"), ("2 without language reward", "reasoning_rl_no_language", "model"),
        ("3 rejection SFT", "sft_general", "model"), ("4 all-scenario RL", "all_scenario_rl", "model"),
        ("student base", "distill", "student_base"), ("student (distilled)", "distill", "model"))


def eval_name(label: str) -> str:
    """The directory under OUT/eval that holds the evaluation of a ROWS label."""
    return label.split(" (")[0].replace(" ", "_")


MATCH_ERRORS = 2.0  # "matches": lower by at most this many paired standard errors


def checks(figures: dict[str, dict], rm: dict,
           stage4_gap: Optional[tuple[float, float]] = None) -> list[tuple[str, bool]]:
    """The claims the embedded default must show, each with whether this run shows it.

    stage4_gap: stage 4's held-out pass@1 minus stage 2's over the same problems, with its paired
    standard error (r1mega.evaluation.paired_difference); None: the difference of the figures, with
    no error. Stage 4 matches stage 2 when it is lower by at most MATCH_ERRORS standard errors: a
    saturated stage 2 (400 of 400 samples right) would otherwise need a stage 4 without one miss."""
    def get(row: str, key: str) -> float:
        return figures.get(row, {}).get(key, math.nan)

    rm_acc = rm.get("heldout_accuracy", math.nan)
    gap, se = stage4_gap or (get("4 all-scenario RL", "pass_at_1") - get("2 reasoning RL", "pass_at_1"), 0.0)
    return [
        ("cold start raises format validity over the base", get("1 cold start", "format_rate") > get("base", "format_rate")),
        ("stage 2 raises held-out pass@1 over stage 1", get("2 reasoning RL", "pass_at_1") > get("1 cold start", "pass_at_1")),
        ("language mixing is lower with the language reward than without",
         get("2 reasoning RL", "mixing_rate") < get("2 without language reward", "mixing_rate")),
        ("the reward model beats chance on held-out pairs by a clear margin (>= 0.75)", rm_acc >= 0.75),
        (f"stage 4 at least matches stage 2 on held-out pass@1 (within {MATCH_ERRORS:g} paired standard errors)",
         gap >= -MATCH_ERRORS * (0.0 if math.isnan(se) else se)),
        ("the student beats its own base", get("student (distilled)", "pass_at_1") > get("student base", "pass_at_1")),
    ]


CLAIMS_FAILED = 3  # r1mega pipeline's exit status when the table is written but a claim does not hold


def table(figures: dict[str, dict], rm: dict, wall: dict[str, float], *,
          heldout_problems: int = HELDOUT_PROBLEMS, stage4_gap: Optional[tuple[float, float]] = None) -> str:
    e = get_recipe(STAGE_RECIPES["eval"]).eval
    keys = ("pass_at_1", "cons_at_k", "greedy_accuracy", "format_rate", "language_rate", "mixing_rate")
    heads = ("pass@1", f"cons@{e.samples}", "greedy", "format", "language", "mixing")
    head = f"{'model':<28}" + "".join(f"{h:>10}" for h in heads)
    lines = [f"held-out: {heldout_problems} additions (English and Chinese), {e.samples} samples at T "
             f"{e.temperature:g}, top-p {e.top_p:g}" + (", + greedy" if e.greedy else ""), head, "-" * len(head)]
    for label, *_ in ROWS:
        f = figures.get(label)
        if f is None:
            continue
        lines.append(f"{label:<28}" + "".join(f"{'n/a':>10}" if f[k] is None or math.isnan(f[k]) else f"{f[k]:>10.3f}"
                                              for k in keys))
    if rm:
        lines.append(f"reward model: held-out pair accuracy {rm.get('heldout_accuracy_before', math.nan):.3f} -> "
                     f"{rm.get('heldout_accuracy', math.nan):.3f}")
    if stage4_gap is not None:
        lines.append(f"stage 4 - stage 2 held-out pass@1: {stage4_gap[0]:+.4f} (paired standard error "
                     f"{stage4_gap[1]:.4f})")
    lines.append("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items()))
    for claim, ok in checks(figures, rm, stage4_gap):
        lines.append(f"[{'yes' if ok else 'NO '}] {claim}")
    return "\n".join(lines)


def run_stages(ctx: Context, stages: dict[str, Callable[[Context], dict]],
               fingerprints: Optional[dict[str, str]] = None) -> list[str]:
    """Run the stages in order, skipping those the manifest records done (whose model, if any,
    still exists); the manifest is saved after each. Returns the names that ran.

    fingerprints: each stage's (stage_fingerprints); a stage recorded with another fingerprint,
    or none, was made with other settings or from other inputs and is redone from scratch, its
    run directory (a killed attempt's too) removed first, so that nothing stale is resumed."""
    ran = []
    for i, (name, fn) in enumerate(stages.items()):
        entry = ctx.manifest["stages"].get(name)
        fingerprint = (fingerprints or {}).get(name)
        changed = fingerprint is not None and entry is not None and entry.get("fingerprint") != fingerprint
        if (entry and entry.get("status") == "done" and not changed
                and (not entry.get("model") or Path(entry["model"]).exists())):
            if ctx.progress:
                print(f"[{i + 1}/{len(stages)}] {name}: done already", file=sys.stderr)
            continue
        if changed:
            _remove_outputs(ctx, name, entry)
            if ctx.progress:
                print(f"[{i + 1}/{len(stages)}] {name}: its settings or inputs changed since it ran: redoing it",
                      file=sys.stderr)
        if fingerprint is not None:  # a killed attempt is resumed only under the same fingerprint
            ctx.manifest["stages"][name] = {"status": "running", "fingerprint": fingerprint}
            ctx.save()
        if ctx.progress:
            print(f"[{i + 1}/{len(stages)}] {name} ... (log: {ctx.path('logs', name + '.log')})", file=sys.stderr)
        t = time.perf_counter()
        entry = fn(ctx)
        entry.setdefault("wall_s", time.perf_counter() - t)
        entry["status"] = "done"
        if fingerprint is not None:
            entry["fingerprint"] = fingerprint
        ctx.manifest["stages"][name] = entry
        ctx.save()
        ran.append(name)
        if ctx.progress:
            print(f"    {name} done in {entry['wall_s']:.0f}s", file=sys.stderr)
    return ran


def _remove_outputs(ctx: Context, name: str, entry: dict) -> None:
    """A stage's run directory and the outputs its entry records, those inside OUT only (the base
    model and the student's base live in the shared cache and are never removed here)."""
    paths = [ctx.path("runs", name), entry.get("model"), *(entry.get("outputs") or {}).values()]
    root = ctx.out.resolve()
    for path in (Path(p) for p in paths if p):
        if not path.resolve().is_relative_to(root) or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# What each stage reads (besides its own recipe): a stage is redone when its settings or an
# input's fingerprint changed.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "data": (), "base": (), "cold_start": ("base",),
    "reasoning_rl": ("data", "cold_start"), "reasoning_rl_no_language": ("data", "cold_start"),
    "rejection_sampling": ("data", "reasoning_rl"), "sft_general": ("base", "rejection_sampling"),
    "reward_model": ("base",), "all_scenario_rl": ("data", "sft_general", "reward_model"),
    "distill": ("data", "reasoning_rl", "rejection_sampling"),
}


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    """Each stage's fingerprint: a hash of its settings (its recipe's whole config; for data the
    pipeline's sizes, for base which base) and of its inputs' fingerprints. The code itself is
    not hashed: a change in r1mega that keeps every setting keeps the fingerprints."""
    p = dataclasses.asdict(cfg.pipeline)
    settings = {"data": {k: p[k] for k in ("heldout_problems", "sample_prompts", "mix_math_prompts")},
                "base": base_source(cfg)}
    out: dict[str, str] = {}
    for name in STAGES:
        own = settings[name] if name in settings else get_recipe(STAGE_RECIPES[name]).to_dict()
        out[name] = _digest({"settings": own, "inputs": {i: out[i] for i in STAGE_INPUTS[name]}})
    return out


def eval_fingerprint(stage_fingerprint: str) -> str:
    """An evaluation's: the evaluated stage's fingerprint and the evaluation recipe's config."""
    return _digest({"stage": stage_fingerprint, "eval": get_recipe(STAGE_RECIPES["eval"]).to_dict()})


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def pipeline_command(cfg: Config, *, progress: bool = True) -> int:
    """``r1mega pipeline``: every stage into cfg.pipeline.out; a failed stage is one line, exit 1.
    With every stage done and the table written, a claim that does not hold is one line naming
    the claims, exit CLAIMS_FAILED (3), so that scripts and CI see it."""
    try:
        manifest = pipeline(cfg.pipeline.out, cfg=cfg, progress=progress)
    except PipelineError as err:
        print(f"r1mega: error: {err}", file=sys.stderr)
        return 1
    failed = [claim for claim, ok in manifest["checks"].items() if not ok]
    if failed:
        print(f"r1mega: error: {len(failed)} of {len(manifest['checks'])} claims do not hold: {'; '.join(failed)} "
              f"(table: {Path(cfg.pipeline.out) / 'table.txt'})", file=sys.stderr)
        return CLAIMS_FAILED
    return 0


def base_source(cfg: Config) -> str:
    """What the pipeline's base model is (recorded in the manifest: a run directory is resumed
    only from the same base): pipeline.base_model, else the embedded base of the pretrain section."""
    return cfg.pipeline.base_model or f"the embedded base {spec_from_config(cfg).cache_name()}"


def pipeline(out: str | Path, *, cfg: Optional[Config] = None, progress: bool = True) -> dict:
    """Run (or resume) every stage into `out`; returns the manifest (also OUT/manifest.json).
    cfg: the pipeline's config (its pipeline section; default: the recipe r1)."""
    cfg = cfg if cfg is not None else get_recipe("r1")
    out = Path(out)
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"recipe": "r1", "stages": {}}
    base = base_source(cfg)
    if cfg.pipeline.base_model is not None and not (Path(cfg.pipeline.base_model) / "config.json").is_file():
        raise PipelineError(f"pipeline.base_model: {cfg.pipeline.base_model} is not a Hugging Face model directory "
                            "(no config.json)")
    if manifest.setdefault("base", base) != base:
        raise PipelineError(f"{out} holds stages made from {manifest['base']}, not {base}: give another --out "
                            f"(or the same base) to resume")
    out.mkdir(parents=True, exist_ok=True)
    manifest["pipeline"] = dataclasses.asdict(cfg.pipeline)
    manifest["stage_recipes"] = dict(STAGE_RECIPES)
    ctx = Context(out, sys.executable, progress, manifest, cfg)
    start = time.perf_counter()
    fingerprints = stage_fingerprints(cfg)
    run_stages(ctx, STAGES, fingerprints)
    figures = {}
    for label, stage, key in ROWS:
        model = manifest["stages"][stage][key]
        if progress:
            print(f"evaluating {label} ...", file=sys.stderr)
        figures[label] = _eval(ctx, eval_name(label), Path(model), eval_fingerprint(fingerprints[stage]))
    rm = manifest["stages"]["reward_model"]["figures"]
    wall = {name: e.get("wall_s", 0.0) for name, e in manifest["stages"].items()}
    gap = paired_gap(ctx, eval_name("4 all-scenario RL"), eval_name("2 reasoning RL"))
    manifest["table"] = figures
    manifest["stage4_gap"] = list(gap) if gap else None
    manifest["checks"] = {claim: ok for claim, ok in checks(figures, rm, gap)}
    manifest["wall_s_this_invocation"] = time.perf_counter() - start
    text = table(figures, rm, wall, heldout_problems=cfg.pipeline.heldout_problems, stage4_gap=gap)
    manifest["table_text"] = text
    ctx.save()
    atomic_write_text(out / "table.txt", text + "\n")
    print(text)
    return manifest


__all__ = ["CLAIMS_FAILED", "Context", "base_source", "PipelineError", "STAGES", "STAGE_RECIPES", "checks", "eval_fingerprint", "eval_name", "paired_gap", "pipeline", "pipeline_command",
           "run_command", "run_stages", "stage_fingerprints", "table"]
