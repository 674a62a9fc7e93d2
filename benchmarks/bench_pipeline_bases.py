"""The R1 pipeline's claims over several base models (r1mega.pipeline_bases).

Runs ``r1mega pipeline`` once per base model, the bases being the embedded default pretrained with
other seeds and thread counts (``--set pretrain.seed=S --set pretrain.threads=T``), each into its
own directory under --out (resumable: run it again and finished runs are read, not redone), then
prints each stage's held-out figures as mean ± std [min, max] and each claim as held on k of N.
Writes benchmarks/results/r1_pipeline_bases.jsonl (one line: every run's table and checks, the
aggregate, the environment) and r1_pipeline_bases_table.txt.

    python benchmarks/bench_pipeline_bases.py --bases s0t2 s0t1 s1t2 s2t1 --jobs 2

About 40 minutes per base on 2 cores (a fresh clone: 43 min 35 s, both base models built inside);
--jobs runs that many pipelines side by side, each with OMP_NUM_THREADS = cores / jobs (the
stages' bits depend on it, the claims must not). The exit status is 3 when a claim fails on some
base.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import RESULTS, append_jsonl, environment

from r1mega.pipeline_bases import aggregate, bases_table


def parse_base(name: str) -> tuple[int, int]:
    """'s1t2' -> (seed 1, threads 2)."""
    m = re.fullmatch(r"s(\d+)t(\d+)", name)
    if not m:
        raise argparse.ArgumentTypeError(f"{name!r}: a base is sSEEDtTHREADS, for example s0t2")
    return int(m[1]), int(m[2])


def run_one(name: str, out: Path, threads_env: int) -> tuple[str, int, float]:
    seed, threads = parse_base(name)
    argv = [sys.executable, "-m", "r1mega", "pipeline", "--out", str(out / name), "--set", f"pretrain.seed={seed}",
            "--set", f"pretrain.threads={threads}"]
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.log", "a") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads_env)})
    return name, proc.returncode, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["s0t2", "s0t1", "s1t2", "s2t1"], type=str,
                        help="base models as sSEEDtTHREADS (pretrain.seed, pretrain.threads)")
    parser.add_argument("--out", default="runs/pipeline-bases", help="one pipeline directory per base under it")
    parser.add_argument("--jobs", type=int, default=1, help="pipelines run side by side")
    parser.add_argument("--no-record", action="store_true", help="print only; write nothing under benchmarks/results")
    args = parser.parse_args()
    for name in args.bases:
        parse_base(name)
    out = Path(args.out)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads_env = max(1, cpus // args.jobs)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run_one(n, out, threads_env), args.bases))
    for name, rc, wall in results:
        print(f"{name}: exit {rc} in {wall:.0f} s (log: {out / (name + '.log')})", file=sys.stderr)
        if rc not in (0, 3):
            print(f"{name}: the pipeline failed; see its log, then run this again to resume", file=sys.stderr)
            return 1
    manifests = {name: json.loads((out / name / "manifest.json").read_text()) for name in args.bases}
    agg = aggregate(manifests)
    text = bases_table(agg)
    print(text)
    if not args.no_record:
        row = {"benchmark": "r1_pipeline_bases", "bases": args.bases, "jobs": args.jobs,
               # this invocation only: finished pipelines are read, not re-run (each run's own time is
               # the sum of its stages')
               "omp_num_threads": threads_env, "wall_s_this_invocation": time.perf_counter() - start,
               "runs": {n: {"table": m["table"], "checks": m["checks"], "base": m["stages"]["base"]["model"],
                            "stage_wall_s": {s: e.get("wall_s") for s, e in m["stages"].items()},
                            "pipeline_wall_s": sum(e.get("wall_s") or 0.0 for e in m["stages"].values())}
                        for n, m in manifests.items()},
               "aggregate": agg, **environment()}
        append_jsonl(RESULTS / "r1_pipeline_bases.jsonl", [row])
        (RESULTS / "r1_pipeline_bases_table.txt").write_text(
            f"$ python benchmarks/bench_pipeline_bases.py --bases {' '.join(args.bases)} --jobs {args.jobs}"
            f"   # {row['date']}, commit {row['git_commit']}\n{text}\n")
    return 0 if all(c["held"] == c["of"] for c in agg["claims"].values()) else 3


if __name__ == "__main__":
    sys.exit(main())
