"""Throughput regression check of one GRPO step on the tiny default, per phase, against a committed baseline.

    python benchmarks/bench_step_phases.py [--repeats 20] [--out PATH]       # measure and check
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

Baselines are per CPU model: ``benchmarks/results/throughput_baseline/<cpu>.json`` (the CPU's
model name from /proc/cpuinfo, as a file name). The normalisation cancels a machine's speed and a
steady load, not its microarchitecture: the same code (835dff5) scored rollout 2.45 on an AMD EPYC
machine, steadily, against 1.87 on the machine its first baseline came from (whose CPU was not
recorded), while logprobs and train scored 0.9x; judged against another CPU's baseline that is a
false 1.31x "regression". On a CPU with no baseline the check judges nothing: it exits 4 with one
line saying how to record one (the test skips: a skip is not a pass).

The check: each phase's score against its CPU's baseline. A score above REGRESSION_FACTOR (1.25)
x the baseline's is a regression; then the step is measured once more in a new process and the run
fails only when a phase fails both times (the lower of its two scores is judged), with one line per
phase naming it, both scores and how to update the baseline. A score below FASTER_FACTOR (0.5) x
the baseline's prints a note suggesting an update but passes. A phase missing on either side fails.
Exit status: 1 on a regression, 2 on a bad baseline file (one line naming the file and the field)
or a workload that is not the baseline's, 3 when the machine was too noisy to judge (below), 4 when
this CPU has no baseline.

Noise: the normalisation cancels a load that is steady over a phase and the references around it,
not one that comes and goes. So each phase's score (the median of its --repeats per-step ratios)
comes with a distribution-free confidence interval for that median (:func:`median_interval`: order
statistics of the ratios; at the default 20 steps the 6th and 15th smallest, 95.9% coverage; at 10
steps, the 2nd and 9th were too far apart on the development machine to tell a 1.4x slowdown). Each
phase is judged on its own: it passes when its whole interval is within the limit and regresses
when its whole interval is over it, confirmed by a second process whose interval is over it too; a
phase whose interval straddles the limit is not judged. With no regression and a phase not judged,
the run exits 3 with one line naming the phase and its interval ("too noisy to judge: ..."), which
the test reports as a skip, not a pass. (An
earlier rule, the reference workload's own spread over 1.10x, skipped on every run of the 2-core
development machine, quiet ones included: the machine's speed drifts by 30-50% over seconds,
which the interleaved ratios cancel and a spread of raw timings does not; on that machine the
ratios' intervals spanned 3-9% when nothing else ran.)

A deliberate slowdown shows that a steady machine still fails a real regression:
``R1MEGA_BENCH_SLOWDOWN=rollout=1.4 python benchmarks/bench_step_phases.py`` makes the named
phase(s) that many times slower (busy-waiting after each call, in the measuring process); it is
printed in the report and refused with --update-baseline.

Updating the baseline is a deliberate act: ``--update-baseline --reason "why"`` measures in
BASELINE_PROCESSES (3) processes, then rewrites this CPU's file (atomically) with the median of
their per-phase scores, the workload, the environment, the date, the commit and the reason (none is
written when the processes' scores of a phase differ by more than AGREEMENT_LIMIT (1.15x), largest
over smallest: not a score the machine reproduces; exit 3). Commit the
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

from _common import RESULTS, append_jsonl, cpu_model, environment, print_table

PHASES = ("refit", "rollout", "logprobs", "train")
BASELINE_DIR = RESULTS / "throughput_baseline"  # one file per CPU model: baseline_path()
REGRESSION_FACTOR = 1.25  # a phase this much slower than the baseline fails the check
FASTER_FACTOR = 0.5  # a phase this much faster gets a note suggesting a baseline update
BASELINE_PROCESSES = 3  # a baseline is the median of this many measuring processes
UPDATE_COMMAND = 'python benchmarks/bench_step_phases.py --update-baseline --reason "..."'
MIN_REPEATS = 6  # the fewest steps whose median has a confidence interval (median_interval)
AGREEMENT_LIMIT = 1.15  # a new baseline's processes must agree this well on every phase's score (quiet 2-core VM: 1.02-1.11x)
EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_TOO_NOISY, EXIT_NO_BASELINE = 1, 2, 3, 4
SLOWDOWN_ENV = "R1MEGA_BENCH_SLOWDOWN"  # "phase=factor[,phase=factor]": a deliberate slowdown, for proofs


# ---------------------------------------------------------------------------------------------
# The baseline file and the comparison (no torch: unit-tested on their own)
# ---------------------------------------------------------------------------------------------
def baseline_path(cpu: str) -> Path:
    """This CPU model's baseline file: BASELINE_DIR / "<cpu model, lower case, runs of anything
    but letters and digits as one '-'>.json"."""
    slug = "".join(c if c.isalnum() else "-" for c in cpu.lower())
    return BASELINE_DIR / ("-".join(filter(None, slug.split("-"))) + ".json")


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


def compare(scores: dict[str, float], baseline: dict[str, float], *, source: str = "the baseline",
            factor: float = REGRESSION_FACTOR, faster: float = FASTER_FACTOR,
            remeasured: dict[str, tuple[float, float]] | None = None, unsure: tuple[str, ...] = ()) -> Verdict:
    """Judge measured `scores` (phase -> score) against `baseline` (phase -> score, from `source`).

    A phase fails when its score > `factor` x its baseline, unless it is `unsure` (its interval
    straddles the limit: not judged); `remeasured` holds both scores of the
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
        if score > factor * base and name not in unsure:
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


ENVIRONMENT_KEYS = ("python", "torch", "machine", "cpu_count")  # a change here can move the scores (the CPU
# model picks the baseline file)


def environment_notes(baseline_env: object, env: dict) -> list[str]:
    """Notes (not failures) where this run's interpreter, torch or machine is not the baseline's:
    the normalisation cancels the machine's speed, not every difference between CPUs or builds."""
    if not isinstance(baseline_env, dict):
        return ["note: the baseline records no environment"]
    differ = [f"{key} {baseline_env.get(key)!r} -> {env.get(key)!r}" for key in ENVIRONMENT_KEYS
              if baseline_env.get(key) != env.get(key)]
    return [f"note: not the baseline's environment ({', '.join(differ)}); a failure may be the machine, "
            "not the code"] if differ else []


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of `values` (at least MIN_REPEATS
    positive numbers): the k-th smallest and k-th largest, k the largest with P(Binomial(n, 1/2) <
    k) <= 2.5% (coverage >= 95%; n = 10: the 2nd and 9th, 97.9%). The sample median lies inside."""
    n = len(values)
    if n < MIN_REPEATS or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ValueError(f"median_interval needs at least {MIN_REPEATS} positive numbers, got {values!r}")
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2 ** n <= 0.025:
        below += math.comb(n, k) / 2 ** n
        k += 1
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def undecided(intervals: dict[str, tuple[float, float]], baseline: dict[str, float],
              factor: float = REGRESSION_FACTOR) -> list[str]:
    """The phases whose score interval (phase -> (low, high)) straddles `factor` x their
    baseline score: neither surely within the limit nor surely over it."""
    return [name for name, (low, high) in intervals.items()
            if name in baseline and low <= factor * baseline[name] < high]


def noise_line(intervals: dict[str, tuple[float, float]], baseline: dict[str, float], repeats: int,
               factor: float = REGRESSION_FACTOR) -> str | None:
    """None when every phase's interval is decided (:func:`undecided`), else the one line saying
    the run is too noisy to judge, naming those phases and their intervals as multiples of the
    baseline."""
    names = undecided(intervals, baseline, factor)
    if not names:
        return None
    spans = ", ".join(f"{name} {intervals[name][0] / baseline[name]:.2f}-{intervals[name][1] / baseline[name]:.2f}x"
                      for name in names)
    return (f"too noisy to judge: the score of {spans} its baseline (confidence interval of the median of "
            f"{repeats} steps) straddles the {factor:.2f}x limit; rerun on a quieter machine")


def disagreement(process_scores: list[dict[str, float]], limit: float = AGREEMENT_LIMIT) -> str | None:
    """For --update-baseline: None when, for every phase, the processes' scores agree within
    `limit` (largest over smallest), else the line naming the phases that do not (a baseline must
    be a score the machine reproduces)."""
    spread = {name: max(s[name] for s in process_scores) / min(s[name] for s in process_scores)
              for name in process_scores[0]}
    wide = {name: x for name, x in spread.items() if x > limit}
    if not wide:
        return None
    return ("too noisy to judge: the processes' scores of " + ", ".join(f"{n} differ by {x:.2f}x" for n, x in wide.items())
            + f" (limit {limit:.2f}x); rerun on a quieter machine")


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
    of the reference's seconds just before and just after it, and their ratio."""
    import gc

    import torch

    torch.set_num_threads(1)
    slowdown = slowdown or {}
    samples: dict[str, list[dict]] = {name: [] for name in PHASES}
    for step in range(repeats + 1):
        # As timeit does: no garbage collection inside a step (a full collection of the step's
        # objects landed in one phase at random, 2x its time), one collection between steps.
        gc.collect()
        gc.disable()
        try:
            before = _timed(reference)
            for name in PHASES:
                seconds = _timed(getattr(steps, name), slowdown.get(name, 1.0))
                if name == "rollout":
                    steps.prepare_batch()
                after = _timed(reference)
                if step:  # the first step warms up (allocator, optimizer state, stream plan)
                    ref = (before + after) / 2
                    samples[name].append({"seconds": seconds, "reference_s": ref, "ratio": seconds / ref})
                before = after
        finally:
            gc.enable()
    return {"phases": samples}


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


def intervals_of(samples: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Each phase's score interval (:func:`median_interval` of its per-step ratios)."""
    return {name: median_interval([s["ratio"] for s in rows]) for name, rows in samples.items()}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote the baseline {path} (reason: {reason}); commit it alone, with the reason in the message")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="measured steps per process, after one warm-up step")
    ap.add_argument("--baseline", help="the baseline file (default: this CPU model's, baseline_path())")
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
    if args.repeats < MIN_REPEATS:
        ap.error(f"--repeats must be >= {MIN_REPEATS} (a median's confidence interval needs them), got {args.repeats}")
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
    cpu = cpu_model()
    baseline_file = Path(args.baseline) if args.baseline else baseline_path(cpu)
    if not args.update_baseline:
        if args.baseline is None and not baseline_file.exists():
            print(f"throughput check skipped: no baseline for this CPU ({cpu}): {baseline_file} does not exist; the "
                  "scores cancel a machine's speed, not its microarchitecture, so another CPU's baseline does not "
                  f"apply. Record one on a quiet machine: {UPDATE_COMMAND}, and commit it")
            return EXIT_NO_BASELINE
        try:
            baseline = load_baseline(baseline_file)
        except BaselineError as err:
            print(f"bench_step_phases: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if baseline["workload"] != workload.as_dict():
            print(f"bench_step_phases: {baseline_file}: field 'workload' {baseline['workload']} is not this "
                  f"script's {workload.as_dict()}, so the scores do not compare; {UPDATE_COMMAND}", file=sys.stderr)
            return EXIT_BAD_INPUT

    import tempfile

    env = environment()
    start = time.perf_counter()
    runs: list[dict] = []  # one measurement per process: {"phases": ..., "intervals": ...}
    noisy: str | None = None  # the line saying why nothing was judged (nor a baseline written)
    with tempfile.TemporaryDirectory(prefix="bench-step-phases-") as tmp:
        model = build_random_model(Path(tmp) / "model", workload.vocab)

        def run() -> dict[str, float]:
            """Measure in a new process; its scores (its score intervals go into ``runs``)."""
            runs.append(measure_in_process(model, args.repeats, Path(tmp) / f"result-{len(runs)}.json"))
            runs[-1]["intervals"] = intervals_of(runs[-1]["phases"])
            return scores_of(runs[-1]["phases"])

        measured = [run() for _ in range(BASELINE_PROCESSES if args.update_baseline else 1)]
        scores = {name: statistics.median(m[name] for m in measured) for name in PHASES}
        verdict, both = None, {}
        if args.update_baseline:
            noisy = disagreement(measured)
        else:
            # Each phase is judged on its own interval: surely over the limit (a regression, confirmed
            # by a second process), surely within, or unsure (not judged; the run then skips unless
            # another phase regressed).
            base, source = baseline["phases"], str(baseline_file)
            latest = dict(runs[0]["intervals"])
            over = [name for name in PHASES if name in base and latest[name][0] > REGRESSION_FACTOR * base[name]]
            if over:  # once more, in a fresh process; the lower score counts
                print(f"over {REGRESSION_FACTOR}x the baseline: {', '.join(over)}; measuring again")
                again = run()
                both = {name: (scores[name], again[name]) for name in over}
                scores.update({name: min(pair) for name, pair in both.items()})
                latest.update({name: runs[1]["intervals"][name] for name in over})
            unsure = tuple(undecided(latest, base))
            verdict = compare(scores, base, source=source, remeasured=both, unsure=unsure)
            if verdict.ok and unsure:
                noisy = noise_line({name: latest[name] for name in unsure}, base, args.repeats)
    total_s = time.perf_counter() - start

    base = baseline["phases"] if baseline else {}
    rows = [{"phase": name,
             "seconds": statistics.median(r["seconds"] for run_ in runs for r in run_["phases"][name]),
             "reference_s": statistics.median(r["reference_s"] for run_ in runs for r in run_["phases"][name]),
             "score": scores[name], "baseline": base.get(name),
             "process_scores": [statistics.median(r["ratio"] for r in run_["phases"][name]) for run_ in runs],
             "process_intervals": [list(run_["intervals"][name]) for run_ in runs]}
            for name in PHASES]
    print(f"\nGRPO step phases, tiny default (Qwen3-MoE, random weights), world 1, 1 thread: {workload.prompts} "
          f"prompts x G={workload.group}, {workload.prompt_tokens} prompt + {workload.new_tokens} new tokens; "
          f"score = phase s / reference s, median of {args.repeats} steps [its confidence interval]; {len(runs)} "
          f"process(es), {total_s:.0f} s; CPU {cpu}")
    if slowdown:
        print(f"note: {SLOWDOWN_ENV} slows down, deliberately: "
              + ", ".join(f"{name} {factor:g}x" for name, factor in slowdown.items()))
    print_table([("phase", -9, lambda r: r["phase"]), ("phase s", 9, lambda r: f"{r['seconds']:.4f}"),
                 ("ref s", 9, lambda r: f"{r['reference_s']:.4f}"), ("score", 8, lambda r: f"{r['score']:.3f}"),
                 ("baseline", 9, lambda r: "-" if r["baseline"] is None else f"{r['baseline']:.3f}"),
                 ("x base", 7, lambda r: "-" if r["baseline"] is None else f"{r['score'] / r['baseline']:.2f}"),
                 ("  per process", -1, lambda r: "  " + " ".join(
                     f"{x:.3f} [{lo:.3f}-{hi:.3f}]" for x, (lo, hi) in zip(r["process_scores"], r["process_intervals"])))],
                rows)
    append_jsonl(args.out, [{"bench": "bench_step_phases", **r, "measured_twice": r["phase"] in both,
                             "too_noisy": bool(noisy), "slowdown": slowdown, "baseline_file": str(baseline_file),
                             "repeats": args.repeats, "workload": workload.as_dict(), **env} for r in rows])
    if noisy:
        print(("no baseline written: " if args.update_baseline else "throughput check skipped: ") + noisy)
        return EXIT_TOO_NOISY
    if args.update_baseline:
        write_baseline(baseline_file, scores, workload, args.repeats, len(runs), args.reason.strip(), env)
        return 0
    for line in [*environment_notes(baseline.get("environment"), env), *verdict.lines]:
        print(line)
    if not verdict.ok:
        return EXIT_REGRESSION
    print(f"throughput check passed: every phase within {REGRESSION_FACTOR}x of its score in {baseline_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
