"""Throughput of reward scoring: the RewardPool against in-process scoring, measured in one run.

    python benchmarks/bench_rewards.py [--n-math 10000] [--n-code 1000] [--workers 1,2]
                                       [--inline-max 200] [--n-sandbox 60] [--out PATH]

Workloads are shipped synthetic tasks with their reference solutions, a third of them corrupted so
both the right and the wrong verdicts are timed: arithmetic (math-verify on the <answer>) and
programming (each test case run in the code sandbox). Providers: "inline" scores in this process
(r1mega.rewards.CompositeReward: the baseline, no isolation) and "pool/W" scores with W worker
processes under deadlines (what the trainer uses). The table prints completions per second, the
cost per completion and the speed relative to inline; one JSON line per row goes to --out.

A second table times the code sandbox itself on --n-sandbox programming completions, under every
backend that works here, on the same completions in the same run, interleaved: all tests of a
completion as the cases of one sandbox (what code rewards do), one sandbox of today's kind per
test, and -- read from git at --previous (the sandbox before it ran a completion in one sandbox)
when the history is there -- the previous implementation, one sandbox per test. The verdicts
must agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_jsonl, environment, print_table
from r1mega.data.synthetic import get_task
from r1mega.rewards import CompositeReward, RewardPool
from r1mega.rewards.code import SANDBOX_PER, case_for_test, code_reward_details, extract_program, passes_test
from r1mega.rewards.sandbox import available_backends, limits_description

WEIGHTS = {"accuracy": 1.0, "format": 1.0}


def _corrupt(completion: str, rng: random.Random) -> str:
    # A wrong final answer: the number or the program's last line changes, the format stays valid.
    head, sep, tail = completion.rpartition("</answer>")
    body_start = head.rfind("<answer>") + len("<answer>")
    answer = head[body_start:]
    if "```" in answer:
        answer = answer.replace("print(", "print(1 + ", 1) if "print(" in answer else answer + "\nraise SystemExit(1)"
    else:
        answer = f" {rng.randint(10**6, 10**7)} "
    return head[:body_start] + answer + sep + tail


def workload(task: str, n: int, seed: int) -> tuple[list, list[str]]:
    spec = get_task(task)
    difficulty = max(spec.difficulties)
    records = spec.generate(n, seed=seed, difficulty=difficulty)
    rng = random.Random(seed)
    completions = [spec.solution(r, style="r1-zero") for r in records]
    completions = [_corrupt(c, rng) if rng.random() < 1 / 3 else c for c in completions]
    return records, completions


def run_inline(records, completions) -> tuple[float, list]:
    scorer = CompositeReward(WEIGHTS)
    start = time.perf_counter()
    scored = scorer.score(records, completions)
    return time.perf_counter() - start, scored


def run_pool(records, completions, workers: int) -> tuple[float, list]:
    with RewardPool(WEIGHTS, workers=workers, timeout_s=60.0) as pool:
        pool.score(records[:workers], completions[:workers])  # warm the workers' imports
        start = time.perf_counter()
        scored = pool.score(records, completions)
        return time.perf_counter() - start, scored


PREVIOUS = "25490cc"  # the last commit whose sandbox ran every test in a sandbox of its own


def previous_sandbox(commit: str):
    """The sandbox module as it was at `commit` (it is self-contained), or None without the history."""
    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:r1mega/rewards/sandbox.py"],
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="r1mega-bench-")) / f"sandbox_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"sandbox_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def score_with(module, completion: str, tests, backend: str) -> float:
    """code_reward's fraction with `module.run_sandboxed` running each test in a sandbox of its own."""
    program = extract_program(completion)
    if program is None:
        return 0.0
    passed = 0
    for test in tests:
        (source, stdin), token = case_for_test(program, test)
        r = module.run_sandboxed(source, stdin=stdin, timeout_s=5.0, memory_mb=512, backend=backend)
        passed += passes_test(test, token, r)
    return passed / len(tests)


def run_sandbox_modes(records, completions, env: dict, seed: int, previous: str) -> list[dict] | None:
    """Per-completion cost of code rewards: one sandbox per completion, one per test, and the
    previous implementation (one per test) when git has it."""
    old = previous_sandbox(previous)
    rows = []
    tests = sum(len(r.tests) for r in records)
    for backend in available_backends():
        providers = {f"{mode}": (lambda c, t, mode=mode: code_reward_details(
            c, t, backend=backend, sandbox_per=mode)[0]) for mode in SANDBOX_PER}
        if old is not None and backend in old.available_backends():
            providers[f"test@{previous}"] = lambda c, t: score_with(old, c, t, backend)
        names = list(providers)
        for fn in providers.values():  # warm each provider's probe
            fn(completions[0], records[0].tests)
        verdicts = {name: [] for name in names}
        seconds = dict.fromkeys(names, 0.0)
        for k, (r, c) in enumerate(zip(records, completions)):
            # interleaved, in rotating order: a load change on the machine hits every provider
            for name in names[k % len(names):] + names[:k % len(names)]:
                start = time.perf_counter()
                verdicts[name].append(providers[name](c, r.tests))
                seconds[name] += time.perf_counter() - start
        for name in names:
            rows.append({"bench": "bench_rewards/sandbox", "backend": backend, "sandbox_per": name,
                         "completions": len(records), "tests": tests, "seconds": seconds[name],
                         "ms_per_completion": 1e3 * seconds[name] / len(records),
                         "accuracy_mean": sum(verdicts[name]) / len(records),
                         "limits": limits_description(), "seed": seed, **env})
        if any(v != verdicts["completion"] for v in verdicts.values()):
            print(f"ERROR: the sandbox providers disagree under {backend}", file=sys.stderr)
            return None
    print()
    ours = {r["backend"]: r for r in rows if r["sandbox_per"] == "completion"}
    print_table([("backend", -9, lambda r: r["backend"]), ("sandbox per", -16, lambda r: r["sandbox_per"]),
                 ("n", 5, lambda r: f"{r['completions']}"), ("tests", 7, lambda r: f"{r['tests']}"),
                 ("seconds", 9, lambda r: f"{r['seconds']:.2f}"), ("ms each", 9, lambda r: f"{r['ms_per_completion']:.1f}"),
                 ("vs completion", 15, lambda r: f"{r['seconds'] / ours[r['backend']]['seconds']:.2f}x"),
                 ("accuracy", 10, lambda r: f"{r['accuracy_mean']:.3f}")], rows)
    print(f"vs completion = provider time / time with one sandbox per completion (same completions, same run); "
          f"test@{previous} = the previous implementation" + ("" if old else " (not run: no git history here)"))
    print(limits_description())
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-math", type=int, default=10_000)
    ap.add_argument("--n-code", type=int, default=1_000)
    ap.add_argument("--workers", default="1,2", help="comma-separated pool sizes")
    ap.add_argument("--inline-max", type=int, default=200,
                    help="the inline baseline scores at most this many completions of a workload "
                         "(rates are compared; the verdicts on that prefix must agree)")
    ap.add_argument("--n-sandbox", type=int, default=60,
                    help="programming completions for the sandbox table (0: skip it)")
    ap.add_argument("--previous", default=PREVIOUS,
                    help="git commit of the previous sandbox, timed as a baseline when the history is there")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "bench_rewards.jsonl"))
    args = ap.parse_args(argv)
    env = environment()
    rows = []
    for name, task, n in (("math", "arithmetic", args.n_math), ("code", "programming", args.n_code)):
        if n <= 0:
            continue
        records, completions = workload(task, n, args.seed)
        providers = [("inline", None)] + [(f"pool/{w}", int(w)) for w in args.workers.split(",")]
        verdicts = {}
        for provider, workers in providers:
            if workers is None:
                m = min(n, args.inline_max)
                seconds, scored = run_inline(records[:m], completions[:m])
            else:
                m = n
                seconds, scored = run_pool(records, completions, workers)
            verdicts[provider] = [s.values.get("accuracy") for s in scored]
            rows.append({"bench": "bench_rewards", "workload": name, "provider": provider,
                         "workers": workers, "completions": m, "seconds": seconds,
                         "completions_per_s": m / seconds, "ms_per_completion": 1e3 * seconds / m,
                         "accuracy_mean": sum(v or 0.0 for v in verdicts[provider]) / m,
                         "errors": sum(bool(s.errors) for s in scored), "seed": args.seed, **env})
        prefix = len(verdicts["inline"])
        if any(v[:prefix] != verdicts["inline"] for v in verdicts.values()):
            print(f"ERROR: providers disagree on the {name} verdicts", file=sys.stderr)
            return 1

    inline = {r["workload"]: r for r in rows if r["provider"] == "inline"}
    print_table([("workload", -9, lambda r: r["workload"]), ("provider", -10, lambda r: r["provider"]),
                 ("n", 7, lambda r: f"{r['completions']}"), ("seconds", 10, lambda r: f"{r['seconds']:.2f}"),
                 ("per s", 10, lambda r: f"{r['completions_per_s']:.1f}"),
                 ("ms each", 9, lambda r: f"{r['ms_per_completion']:.2f}"),
                 ("vs inline", 10, lambda r: f"{r['completions_per_s'] / inline[r['workload']]['completions_per_s']:.2f}x"),
                 ("accuracy", 10, lambda r: f"{r['accuracy_mean']:.3f}"), ("errors", 7, lambda r: f"{r['errors']}")],
                rows)
    print("vs inline = rate / inline rate (>1: faster than scoring in this process); a third of "
          "the completions are corrupted (code accuracy is the fraction of tests passed)")
    if args.n_sandbox > 0:
        if not available_backends():
            print("ERROR: no sandbox backend works here for the sandbox table", file=sys.stderr)
            return 1
        records, completions = workload("programming", args.n_sandbox, args.seed)
        sandbox_rows = run_sandbox_modes(records, completions, env, args.seed, args.previous)
        if sandbox_rows is None:
            return 1
        rows += sandbox_rows
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
