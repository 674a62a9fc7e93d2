"""Time r1mega.batching on both backends: Karmarkar–Karp partition and micro-batch packing.

    python benchmarks/bench_balance.py [--n 100000] [--ks 8,64] [--max-tokens 16384] [--out PATH]

Lengths imitate a GRPO rollout batch (seeded): a prompt of 64..512 tokens plus a lognormal
response (median ~e^6.3 = 545 tokens, heavy right tail) truncated at 8192 tokens. Each
(op, k) is timed through the public API (validation and list conversion included) as the median
of several repeats, fewer for the slow Python backend. The table prints seconds, the speed ratio
(python / cpp) and the imbalance: largest rank sum / max(total / k, longest) (1.0 is optimal).
Both backends must return identical index lists; the script checks it. One JSON line per row,
with environment info, is appended to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from _common import RESULTS, append_jsonl, environment
from r1mega.batching import available_backends, imbalance, lower_bound, pack_microbatches, partition_balanced



def rollout_lengths(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(64, 513, n)
    response = np.clip(rng.lognormal(mean=6.3, sigma=1.0, size=n), 1, 8192).astype(np.int64)
    return (prompt + response).astype(np.int64)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of sequences")
    ap.add_argument("--ks", default="8,64", help="comma-separated data-parallel sizes")
    ap.add_argument("--max-tokens", type=int, default=16384, help="micro-batch token budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats-cpp", type=int, default=9)
    ap.add_argument("--repeats-python", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "bench_balance.jsonl"))
    args = ap.parse_args(argv)

    backends = available_backends()
    if "cpp" not in backends:
        print("warning: r1mega._batching is not built; timing the Python backend only", file=sys.stderr)
    ks = [int(x) for x in args.ks.split(",")]
    lengths = rollout_lengths(args.n, args.seed)
    env = environment()
    total, longest = int(lengths.sum()), int(lengths.max())
    print(
        f"n={args.n} total={total} longest={longest} mean={total / args.n:.0f} "
        f"max_tokens={args.max_tokens} backends={backends}"
    )

    ops = {
        "partition": lambda k, be: partition_balanced(lengths, k, backend=be),
        "pack": lambda k, be: pack_microbatches(lengths, args.max_tokens, k, backend=be),
    }
    rows = []
    for op, fn in ops.items():
        for k in ks:
            results = {}
            for be in backends:
                reps = args.repeats_cpp if be == "cpp" else args.repeats_python
                secs, out = timed(lambda: fn(k, be), reps)
                results[be] = (secs, out, reps)
            outs = [r[1] for r in results.values()]
            identical = all(o == outs[0] for o in outs)
            base = results.get("cpp", results["python"])[0]
            for be, (secs, out, reps) in results.items():
                if op == "partition":
                    groups, mbs, fill = out, None, None
                else:
                    groups = [sorted(i for mb in rank for i in mb) for rank in out]
                    mbs = len(out[0]) if out else 0
                    sums = [int(lengths[mb].sum()) for rank in out for mb in rank if mb]
                    fill = sum(sums) / (len(sums) * args.max_tokens) if sums else None
                rows.append(
                    {
                        "bench": "bench_balance",
                        "backend": be,
                        "op": op,
                        "k": k,
                        "n": args.n,
                        "max_tokens": args.max_tokens if op == "pack" else None,
                        "seconds": secs,
                        "repeats": reps,
                        "speed_ratio_vs_cpp": (secs / base) if "cpp" in results else None,
                        "imbalance": imbalance(lengths, groups),
                        "lower_bound": lower_bound(lengths, k),
                        "max_group_sum": max(int(lengths[g].sum()) for g in groups),
                        "microbatches_per_rank": mbs,
                        "mean_microbatch_fill": fill,
                        "identical_across_backends": identical,
                        "seed": args.seed,
                        **env,
                    }
                )
            if not identical:
                print(f"ERROR: backends disagree on {op} k={k}", file=sys.stderr)

    header = f"{'backend':<8} {'op':<10} {'k':>4} {'seconds':>10} {'ratio':>8} {'imbalance':>12} {'mb/rank':>8} {'fill':>6} {'same':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['speed_ratio_vs_cpp']:.1f}x" if r["speed_ratio_vs_cpp"] is not None else "-"
        mbs = str(r["microbatches_per_rank"]) if r["microbatches_per_rank"] is not None else "-"
        fill = f"{r['mean_microbatch_fill']:.3f}" if r["mean_microbatch_fill"] is not None else "-"
        print(
            f"{r['backend']:<8} {r['op']:<10} {r['k']:>4} {r['seconds']:>10.4f} {ratio:>8} "
            f"{r['imbalance']:>12.7f} {mbs:>8} {fill:>6} {'yes' if r['identical_across_backends'] else 'NO':>5}"
        )
    print("ratio = seconds / cpp seconds (python's ratio is the C++ speed-up); imbalance = max rank sum / "
          "max(total/k, longest); fill = mean micro-batch tokens / max_tokens")

    append_jsonl(args.out, rows)
    return 0 if all(r["identical_across_backends"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
