"""Throughput regression check of one GRPO step on the tiny default, per phase, against a committed baseline.

    python benchmarks/bench_step_phases.py [--repeats 10] [--out PATH]       # measure and check
    python benchmarks/bench_step_phases.py --update-baseline --reason "..."  # measure, rewrite the baseline

What it measures: r1mega's real components as ``r1mega train`` (r1mega/trainer/loop.py) builds and
calls them, in one process (a one-rank gloo group, world 1, CPU, one thread), on the tiny default's
architecture (r1mega.models.tiny: Qwen3-MoE, 4 layers, hidden 128, 8 experts top-2) with random
weights and the ``tiny`` recipe's GRPO settings (:class:`Workload`: 4 prompts of 64 random tokens,
G = 8 completions each, every completion exactly 32 tokens: ``ignore_eos``, no early stop, so the
work of every phase is the same in every step). One step is:

* ``refit``: ``Colocation.refit`` (offload the training state, wake the engine, stream the
  policy's weights into it, wake its KV cache);
* ``rollout``: the ``hf`` engine generating G completions of each prompt;
* (untimed: advantages of fixed random rewards, the training batch, ``Colocation.release``);
* ``logprobs``: ``policy.logprobs`` (the old log-probs) and the reference policy's;
* ``train``: ``policy.train_step`` on the batch (the recipe's loss options, TIS, KL to the reference).

Each phase is normalised by a reference workload (:class:`ReferenceWorkload`: plain torch of the
same character, single-threaded, on a working set of the model's size) measured in the same
process, interleaved with the phases (reference, phase, reference, phase, ...: both see the same
machine speed and background load). A phase's sample is its time over the mean of the two
reference times around it; its score is the median of its samples over --repeats steps (after
one warm-up step, garbage collection between steps only). Each measurement runs in a fresh
process, the model built once by the driver.

The check: each phase's score against ``benchmarks/results/throughput_baseline.json``. A score
above REGRESSION_FACTOR (1.25) x the baseline's is a regression; then the step is measured once
more in a new process and the run fails only when a phase fails both times (the lower of its two
scores is judged), with one line per phase naming it, both scores and how to update the baseline.
A score below FASTER_FACTOR (0.5) x the baseline's prints a note suggesting an update but passes.
A phase missing on either side fails. Exit status: 1 on a regression, 2 on a bad baseline file
(one line naming the file and the field) or a workload that is not the baseline's, 3 when the
machine was too noisy to judge (below).

Noise: the normalisation cancels a steady load, not one that changes from one moment to the next
(on the 2-core machine, beside other test runs at load average 8-20, the rollout phase scored
1.31-1.41x its baseline while train scored 0.84-0.87x, with no code change). Each process therefore
measures how much the reference workload itself varies: its spread is the upper over the lower
quartile of its --repeats timings at one position of the step, the largest over the 5 positions
(:func:`position_spread`). A measurement whose spread is over
NOISE_LIMIT (1.10x) judges nothing: the run stops there and exits 3 with one line giving the spread
("too noisy to judge: ..."), which the test reports as a skip, not a pass. Only steady measurements
are judged, so a regression fails on two steady ones (a noisy re-measurement also exits 3).

A deliberate slowdown shows that a steady machine still fails a real regression:
``R1MEGA_BENCH_SLOWDOWN=rollout=1.4 python benchmarks/bench_step_phases.py`` makes the named
phase(s) that many times slower (busy-waiting after each call, in the measuring process); it is
printed in the report and refused with --update-baseline.

Updating the baseline is a deliberate act: ``--update-baseline --reason "why"`` measures in
BASELINE_PROCESSES (3) processes, then rewrites the file (atomically) with the median of their
per-phase scores, the workload, the environment, the date, the commit and the reason (none is
written when one of the processes is too noisy: exit 3). Commit the
file on its own, the reason in the message, so that the change is reviewed. The check runs in the
test suite (tests/test_throughput_regression.py), also beside CPU-bound processes (.ci/under-load).
Every run appends one JSON line per phase, with the environment, to --out (default
benchmarks/results/bench_step_phases.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from _common import RESULTS, append_jsonl, environment, print_table

PHASES = ("refit", "rollout", "logprobs", "train")
BASELINE = RESULTS / "throughput_baseline.json"
REGRESSION_FACTOR = 1.25  # a phase this much slower than the baseline fails the check
FASTER_FACTOR = 0.5  # a phase this much faster gets a note suggesting a baseline update
BASELINE_PROCESSES = 3  # a baseline is the median of this many measuring processes
UPDATE_COMMAND = 'python benchmarks/bench_step_phases.py --update-baseline --reason "..."'
NOISE_LIMIT = 1.10  # the reference's spread (q3/q1 of its timings) above which a run judges nothing
EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_TOO_NOISY = 1, 2, 3
SLOWDOWN_ENV = "R1MEGA_BENCH_SLOWDOWN"  # "phase=factor[,phase=factor]": a deliberate slowdown, for proofs


# ---------------------------------------------------------------------------------------------
# The baseline file and the comparison (no torch: unit-tested on their own)
# ---------------------------------------------------------------------------------------------
class BaselineError(ValueError):
    """The baseline file is missing, unreadable or malformed; the message is one line naming the
    file and the field."""


def load_baseline(path: str | Path) -> dict:
    """The baseline at `path`, checked: an object with ``phases`` (phase -> positive finite score),
    ``workload`` (an object), ``reason`` (a non-empty string), ``date`` and ``commit``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no baseline file; measure one with {UPDATE_COMMAND}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BaselineError(f"{path}: cannot read the baseline ({err})") from None
    except json.JSONDecodeError as err:
        raise BaselineError(f"{path}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, dict):
        raise BaselineError(f"{path}: the baseline must be a JSON object, got {type(data).__name__}")
    phases = data.get("phases")
    if not isinstance(phases, dict) or not phases:
        raise BaselineError(f"{path}: field 'phases' must be a non-empty object of phase -> score, got {phases!r}")
    for name, score in phases.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score <= 0:
            raise BaselineError(f"{path}: field 'phases.{name}' must be a positive number, got {score!r}")
    if not isinstance(data.get("workload"), dict):
        raise BaselineError(f"{path}: field 'workload' must be an object, got {data.get('workload')!r}")
    for key in ("reason", "date", "commit"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise BaselineError(f"{path}: field {key!r} must be a non-empty string, got {data.get(key)!r}")
    return data


@dataclass
class Verdict:
    """The comparison of measured scores with the baseline's: `regressions` (phase names over
    the threshold), `faster` (phase names under FASTER_FACTOR x baseline), `problems` (phases
    missing on either side), and one message line per finding in `lines`."""

    regressions: list[str]
    faster: list[str]
    problems: list[str]
    lines: list[str]

    @property
    def ok(self) -> bool:
        return not self.regressions and not self.problems


def compare(scores: dict[str, float], baseline: dict[str, float], *, source: str = str(BASELINE),
            factor: float = REGRESSION_FACTOR, faster: float = FASTER_FACTOR,
            remeasured: dict[str, tuple[float, float]] | None = None) -> Verdict:
    """Judge measured `scores` (phase -> score) against `baseline` (phase -> score, from `source`).

    A phase fails when its score > `factor` x its baseline; `remeasured` holds both scores of the
    phases measured twice (their score in `scores` is the lower; the message gives both). A phase
    measured but absent from the baseline, or in the baseline but not measured, is a problem (the
    baseline needs updating). Under `faster` x baseline: a note, not a failure."""
    regressions, quicker, problems, lines = [], [], [], []
    for name in sorted(set(baseline) - set(scores)):
        problems.append(name)
        lines.append(f"phase {name!r} is in the baseline {source} but was not measured; "
                     f"update the baseline: {UPDATE_COMMAND}")
    for name, score in scores.items():
        if name not in baseline:
            problems.append(name)
            lines.append(f"phase {name!r} has no baseline score in {source}; add it: {UPDATE_COMMAND}")
            continue
        base = baseline[name]
        if score > factor * base:
            regressions.append(name)
            again = (f" (measured twice, in two processes: {remeasured[name][0]:.3f}, then "
                     f"{remeasured[name][1]:.3f}; the lower counts)" if remeasured and name in remeasured else "")
            lines.append(f"THROUGHPUT REGRESSION in phase {name!r}: score {score:.3f} vs baseline {base:.3f} "
                         f"({score / base:.2f}x, limit {factor:.2f}x){again}. If the slowdown is intended, "
                         f"update {source} with {UPDATE_COMMAND} and commit it with the reason")
        elif score < faster * base:
            quicker.append(name)
            lines.append(f"note: phase {name!r} is much faster than its baseline: score {score:.3f} vs "
                         f"{base:.3f} ({score / base:.2f}x); consider updating the baseline: {UPDATE_COMMAND}")
    return Verdict(regressions, quicker, problems, lines)


ENVIRONMENT_KEYS = ("python", "torch", "machine", "cpu_count")  # a change here can move the scores


def environment_notes(baseline_env: object, env: dict) -> list[str]:
    """Notes (not failures) where this run's interpreter, torch or machine is not the baseline's:
    the normalisation cancels the machine's speed, not every difference between CPUs or builds."""
    if not isinstance(baseline_env, dict):
        return ["note: the baseline records no environment"]
    differ = [f"{key} {baseline_env.get(key)!r} -> {env.get(key)!r}" for key in ENVIRONMENT_KEYS
              if baseline_env.get(key) != env.get(key)]
    return [f"note: not the baseline's environment ({', '.join(differ)}); a failure may be the machine, "
            "not the code"] if differ else []


def reference_spread(times: list[float]) -> float:
    """How much the reference workload's own timings vary in one process: the ratio of their upper
    to their lower quartile (1.0: every call took as long; 1.10: the middle half of the calls spans
    10%). The phases are timed between these calls, so a machine whose speed moves this much from
    one call to the next cannot tell a 1.25x slowdown of a phase from its own noise."""
    if len(times) < 4 or any(not (math.isfinite(t) and t > 0) for t in times):
        raise ValueError(f"reference_spread needs at least 4 positive timings, got {times!r}")
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q3 / q1


def position_spread(by_position: list[list[float]]) -> float:
    """The largest :func:`reference_spread` of the reference's timings at one position of the step
    over the steps. Positions are kept apart because what ran just before shifts the reference's
    time steadily (after train it is slower than after refit, on a quiet machine too: pooled, a
    quiet run measured 1.35x); only the variation from one step to the next at the same position
    is the machine's noise."""
    return max(reference_spread(times) for times in by_position)


def noise_line(spread: float, timings: int, *, limit: float = NOISE_LIMIT) -> str | None:
    """None when a process's reference `spread` (over `timings` calls) is within `limit`, else the
    one line that says the run is too noisy to judge."""
    if spread <= limit:
        return None
    return (f"too noisy to judge: the reference workload's timings spread {spread:.2f}x (upper/lower "
            f"quartile of {timings} calls in one process; limit {limit:.2f}x), too much to tell a "
            f"{REGRESSION_FACTOR:.2f}x slowdown from the machine's noise; rerun on a quieter machine")


def parse_slowdown(text: str | None) -> dict[str, float]:
    """The deliberate slowdown of SLOWDOWN_ENV, e.g. "rollout=1.4": each named phase is made that
    many times slower (busy-waiting after it), to show that the check fails a real slowdown."""
    if not text or not text.strip():
        return {}
    out = {}
    for item in text.split(","):
        name, sep, factor = item.partition("=")
        name = name.strip()
        try:
            value = float(factor) if sep else float("nan")
        except ValueError:
            value = float("nan")
        if name not in PHASES or not (math.isfinite(value) and value >= 1):
            raise ValueError(f"{SLOWDOWN_ENV}={text!r}: expected phase=factor[,...] with a phase in "
                             f"{PHASES} and a factor >= 1, got {item!r}")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The step's sizes (recorded in the baseline: scores of another workload do not compare)."""

    prompts: int = 4
    group: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 32
    vocab: int = 512

    def as_dict(self) -> dict:
        return asdict(self)


class ReferenceWorkload:
    """Fixed plain-torch work of the phases' character, single-threaded, on a working set of the
    model's size (so that it feels the same cache and memory pressure as the phases): a Python
    loop of small matmuls and elementwise ops cycling through 8 MB of weights (dispatch- and
    cache-bound, as a decode step reading every layer), larger matmuls (as a training step) and
    copies of 32 MB (as a weight stream)."""

    LAYERS = 32  # [128, 512] fp32 weights: 8 MB, the tiny default's parameters are 7 MB

    def __init__(self, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(128, 512, generator=g) / 128 ** 0.5 for _ in range(self.LAYERS)]
        self.x = torch.randn(32, 128, generator=g)
        self.tokens = torch.randn(2048, 128, generator=g)
        self.src = torch.randn(8 << 20, generator=g)
        self.dst = torch.empty_like(self.src)

    def __call__(self) -> float:
        import torch

        x = self.x
        for i in range(400):
            w = self.weights[i % self.LAYERS]
            x = x + torch.nn.functional.silu(x @ w) @ w.T * 0.1
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.tokens
        for w in self.weights[:3]:
            y = torch.nn.functional.silu(y @ w) @ w.T
        for _ in range(4):
            self.dst.copy_(self.src)
        return float(x[0, 0]) + float(y[0, 0])


def build_random_model(out: Path, vocab: int, seed: int = 0) -> Path:
    """save_pretrained a randomly initialised tiny default (r1mega.models.tiny) into `out`."""
    import torch
    import transformers

    from r1mega.models.tiny import tiny_moe_config

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**tiny_moe_config(vocab_size=vocab))
    transformers.AutoModelForCausalLM.from_config(config).float().eval().save_pretrained(out)
    return out


class StepPhases:
    """The policy, reference, engine and colocation of one GRPO step, built as the trainer builds
    them; one method per phase (called in PHASES order, with :meth:`prepare_batch` after rollout)."""

    def __init__(self, model_dir: Path, workload: Workload):
        import torch

        from r1mega.models import load_policy
        from r1mega.recipes import get_recipe
        from r1mega.rollout import Colocation, engine_from_config, sampling_params
        from r1mega.trainer import steps as S

        cfg = get_recipe("tiny").with_values({
            "batch.prompts_per_step": workload.prompts, "rollout.max_new_tokens": workload.new_tokens})
        self.cfg, self.workload, self.S = cfg, workload, S
        rollout_cfg = cfg.rollout
        self.policy = load_policy(model_dir, parallel=cfg.parallel, optim=cfg.optim,
                                  temperature=rollout_cfg.temperature, seed=cfg.run.seed)
        self.reference = load_policy(model_dir, parallel=cfg.parallel, trainable=False,
                                     temperature=rollout_cfg.temperature, seed=cfg.run.seed, load_optimizer=False)
        self.engine = engine_from_config(rollout_cfg, self.policy.desc.config, seed=cfg.run.seed)
        self.colocation = Colocation(self.policy, self.engine, rollout_cfg, dst_ranks=[0])
        self.params = replace(sampling_params(rollout_cfg, n=workload.group, seed=cfg.run.seed), ignore_eos=True)
        g = torch.Generator().manual_seed(1)
        self.prompt_ids = [torch.randint(10, workload.vocab, (workload.prompt_tokens,), generator=g).tolist()
                           for _ in range(workload.prompts)]
        self.rewards = torch.randint(0, 2, (workload.prompts * workload.group,), generator=g).double()
        self.loss_spec = cfg.grpo.loss_spec(max_new_tokens=rollout_cfg.max_new_tokens, has_reference=True)
        self.completions = None
        self.batch = None

    def refit(self) -> None:
        self.colocation.refit()

    def rollout(self) -> None:
        self.completions = self.engine.generate(self.prompt_ids, self.params)
        lengths = {len(c) for c in self.completions}
        if lengths != {self.workload.new_tokens}:
            raise RuntimeError(f"completion lengths {sorted(lengths)}, expected exactly {self.workload.new_tokens}")

    def prepare_batch(self) -> None:
        """Untimed, between rollout and logprobs: advantages of the fixed random rewards, the
        training batch, the engine put to sleep (Colocation.release), as the trainer does."""
        from r1mega.data.records import PromptRecord

        S = self.S
        group = [c.prompt_index for c in self.completions]
        records = [PromptRecord(id=str(i), prompt="", task="math", answer="1") for i in group]
        rollout = S.Rollout(records, [self.prompt_ids[i] for i in group], list(self.completions),
                            [""] * len(group), group)
        self.batch = S.build_batch(rollout, S.advantages(self.rewards, rollout.group, self.cfg.grpo), pad_id=0)
        self.colocation.release()

    def logprobs(self) -> None:
        batch, batch_cfg = self.batch, self.cfg.batch
        budget = batch_cfg.micro_batch_tokens
        batch.old_logp = self.policy.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                              balance=batch_cfg.balance)
        batch.ref_logp = self.reference.logprobs(batch.input_ids, batch.attention_mask, micro_batch_tokens=budget,
                                                 balance=batch_cfg.balance)

    def train(self) -> None:
        batch_cfg = self.cfg.batch
        for mb in self.S.minibatches(self.batch, batch_cfg.minibatches_per_step):
            self.policy.train_step(mb.train_tensors(tis=self.cfg.grpo.tis, replay=False), self.loss_spec,
                                   micro_batch_tokens=batch_cfg.micro_batch_tokens, balance=batch_cfg.balance)


def measure(steps: StepPhases, reference: ReferenceWorkload, repeats: int,
            slowdown: dict[str, float] | None = None) -> dict:
    """``phases``: per phase, one sample per step after a warm-up step: the phase's seconds, the mean
    of the reference's seconds just before and just after it, and their ratio; ``reference_s``:
    the reference's timings after the warm-up step by position in the step (before the first
    phase, after each phase), for :func:`position_spread`."""
    import gc

    import torch

    torch.set_num_threads(1)
    slowdown = slowdown or {}
    samples: dict[str, list[dict]] = {name: [] for name in PHASES}
    references: list[list[float]] = [[] for _ in range(len(PHASES) + 1)]
    for step in range(repeats + 1):
        # As timeit does: no garbage collection inside a step (a full collection of the step's
        # objects landed in one phase at random, 2x its time), one collection between steps.
        gc.collect()
        gc.disable()
        try:
            before = _timed(reference)
            if step:
                references[0].append(before)
            for position, name in enumerate(PHASES, start=1):
                seconds = _timed(getattr(steps, name), slowdown.get(name, 1.0))
                if name == "rollout":
                    steps.prepare_batch()
                after = _timed(reference)
                if step:  # the first step warms up (allocator, optimizer state, stream plan)
                    references[position].append(after)
                    ref = (before + after) / 2
                    samples[name].append({"seconds": seconds, "reference_s": ref, "ratio": seconds / ref})
                before = after
        finally:
            gc.enable()
    return {"phases": samples, "reference_s": references}


def _timed(fn, factor: float = 1.0) -> float:
    """Seconds of fn(); with factor > 1 (a deliberate slowdown), busy-wait until factor x as long."""
    t0 = time.perf_counter()
    fn()
    if factor > 1:
        end = t0 + factor * (time.perf_counter() - t0)
        while time.perf_counter() < end:
            pass
    return time.perf_counter() - t0


def scores_of(samples: dict[str, list[dict]]) -> dict[str, float]:
    """Each phase's score: the median of its per-step ratios (`samples`: a measurement's ``phases``)."""
    return {name: statistics.median(s["ratio"] for s in rows) for name, rows in samples.items()}


def worker(args) -> None:
    """One measuring process: the step built from --model, --repeats steps; samples to --result."""
    import warnings

    warnings.filterwarnings("ignore")
    steps = StepPhases(Path(args.model), Workload())
    measured = measure(steps, ReferenceWorkload(), args.repeats, parse_slowdown(os.environ.get(SLOWDOWN_ENV)))
    Path(args.result).write_text(json.dumps(measured))


def measure_in_process(model: Path, repeats: int, result: Path) -> dict:
    """Run :func:`worker` in a fresh process (one thread, no torch.compile, CPU only): each
    measurement gets its own process, so a process-wide accident (memory layout, the core it
    landed on) does not repeat in the re-measurement."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model),
                    "--repeats", str(repeats), "--result", str(result)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def write_baseline(path: Path, scores: dict[str, float], workload: Workload, repeats: int, processes: int,
                   reason: str, env: dict) -> None:
    """The baseline file (atomically): scores, workload, environment, date, commit, reason."""
    from r1mega.utils.io import atomic_write_text

    data = {"bench": "bench_step_phases", "phases": {k: round(v, 4) for k, v in scores.items()},
            "workload": workload.as_dict(), "repeats": repeats, "processes": processes, "reason": reason,
            "date": env["date"], "commit": env["git_commit"] or "unknown", "environment": env,
            "how_to_update": UPDATE_COMMAND + " (then commit this file alone, the reason in the message)"}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote the baseline {path} (reason: {reason}); commit it alone, with the reason in the message")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="measured steps per process, after one warm-up step")
    ap.add_argument("--baseline", default=str(BASELINE), help="the baseline file")
    ap.add_argument("--update-baseline", action="store_true",
                    help=f"rewrite the baseline: the median of {BASELINE_PROCESSES} processes' scores")
    ap.add_argument("--reason", help="why the baseline changes (required with --update-baseline)")
    ap.add_argument("--out", default=str(RESULTS / "bench_step_phases.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.update_baseline and not (args.reason or "").strip():
        ap.error('--update-baseline needs --reason "why the baseline changes" (it is recorded in the file)')
    try:
        slowdown = parse_slowdown(os.environ.get(SLOWDOWN_ENV))
    except ValueError as err:
        print(f"bench_step_phases: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if slowdown and args.update_baseline:
        print(f"bench_step_phases: {SLOWDOWN_ENV} is set: no baseline from a deliberately slowed step",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    workload = Workload()
    baseline = None
    if not args.update_baseline:
        try:
            baseline = load_baseline(args.baseline)
        except BaselineError as err:
            print(f"bench_step_phases: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if baseline["workload"] != workload.as_dict():
            print(f"bench_step_phases: {args.baseline}: field 'workload' {baseline['workload']} is not this "
                  f"script's {workload.as_dict()}, so the scores do not compare; {UPDATE_COMMAND}", file=sys.stderr)
            return EXIT_BAD_INPUT

    import tempfile

    env = environment()
    start = time.perf_counter()
    runs: list[dict] = []  # one measurement per process: {"phases": ..., "reference_s": [...]}
    noisy: str | None = None  # the line saying why nothing was judged
    with tempfile.TemporaryDirectory(prefix="bench-step-phases-") as tmp:
        model = build_random_model(Path(tmp) / "model", workload.vocab)

        def run() -> dict[str, float]:
            """Measure in a new process; its scores. Sets `noisy` when its reference varied too much."""
            nonlocal noisy
            runs.append(measure_in_process(model, args.repeats, Path(tmp) / f"result-{len(runs)}.json"))
            refs = runs[-1]["reference_s"]
            runs[-1]["spread"] = position_spread(refs)
            noisy = noisy or noise_line(runs[-1]["spread"], sum(map(len, refs)))
            return scores_of(runs[-1]["phases"])

        # A measurement is judged only when its process's reference workload was steady (NOISE_LIMIT):
        # the first noisy one ends the run, judging nothing (exit EXIT_TOO_NOISY: the test skips).
        measured = []
        for _ in range(BASELINE_PROCESSES if args.update_baseline else 1):
            measured.append(run())
            if noisy:
                break
        scores = {name: statistics.median(m[name] for m in measured) for name in PHASES}
        verdict, both = None, {}
        if baseline is not None and not noisy:
            verdict = compare(scores, baseline["phases"], source=args.baseline)
            if verdict.regressions:  # once more, in a fresh process; the lower score counts
                print(f"over {REGRESSION_FACTOR}x the baseline: {', '.join(verdict.regressions)}; measuring again")
                again = run()
                both = {name: (scores[name], again[name]) for name in verdict.regressions}
                scores.update({name: min(pair) for name, pair in both.items()})
                verdict = compare(scores, baseline["phases"], source=args.baseline, remeasured=both)
    total_s = time.perf_counter() - start

    base = baseline["phases"] if baseline else {}
    rows = [{"phase": name,
             "seconds": statistics.median(r["seconds"] for run_ in runs for r in run_["phases"][name]),
             "reference_s": statistics.median(r["reference_s"] for run_ in runs for r in run_["phases"][name]),
             "score": scores[name], "baseline": base.get(name),
             "process_scores": [statistics.median(r["ratio"] for r in run_["phases"][name]) for run_ in runs]}
            for name in PHASES]
    spreads = [run_["spread"] for run_ in runs]
    print(f"\nGRPO step phases, tiny default (Qwen3-MoE, random weights), world 1, 1 thread: {workload.prompts} "
          f"prompts x G={workload.group}, {workload.prompt_tokens} prompt + {workload.new_tokens} new tokens; "
          f"score = phase s / reference s, median of {args.repeats} steps; {len(runs)} process(es), {total_s:.0f} s; "
          f"reference spread (q3/q1) per process {' '.join(f'{x:.3f}x' for x in spreads)} (limit {NOISE_LIMIT:.2f}x)")
    if slowdown:
        print(f"note: {SLOWDOWN_ENV} slows down, deliberately: "
              + ", ".join(f"{name} {factor:g}x" for name, factor in slowdown.items()))
    print_table([("phase", -9, lambda r: r["phase"]), ("phase s", 9, lambda r: f"{r['seconds']:.4f}"),
                 ("ref s", 9, lambda r: f"{r['reference_s']:.4f}"), ("score", 8, lambda r: f"{r['score']:.3f}"),
                 ("baseline", 9, lambda r: "-" if r["baseline"] is None else f"{r['baseline']:.3f}"),
                 ("x base", 7, lambda r: "-" if r["baseline"] is None else f"{r['score'] / r['baseline']:.2f}"),
                 ("  per process", -1, lambda r: "  " + " ".join(f"{x:.3f}" for x in r["process_scores"]))],
                rows)
    append_jsonl(args.out, [{"bench": "bench_step_phases", **r, "measured_twice": r["phase"] in both,
                             "reference_spreads": spreads, "too_noisy": bool(noisy), "slowdown": slowdown,
                             "repeats": args.repeats, "workload": workload.as_dict(), **env} for r in rows])
    if noisy:
        print(("no baseline written: " if args.update_baseline else "throughput check skipped: ") + noisy)
        return EXIT_TOO_NOISY
    if args.update_baseline:
        write_baseline(Path(args.baseline), scores, workload, args.repeats, len(runs), args.reason.strip(), env)
        return 0
    for line in [*environment_notes(baseline.get("environment"), env), *verdict.lines]:
        print(line)
    if not verdict.ok:
        return EXIT_REGRESSION
    print(f"throughput check passed: every phase within {REGRESSION_FACTOR}x of its score in {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
