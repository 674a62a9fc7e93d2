"""Time r1mega.models.Policy per layout on CPU: GRPO train step, log-probs, HF load, the bucket stream.

    python benchmarks/bench_policy.py [--rows 8 --seq 64 --micro-batch 2 --repeats 5] [--out PATH]
        [--head-rows 8 --head-seq 256 --head-budget 1024] [--skip-layouts]

Two random DeepSeek-V3 models (MLA + MoE) are built with transformers into a temporary directory:
"tiny" (the test fixture's size: 3 layers, hidden 64, 8 experts, vocab 256) for the step timings,
and "medium" (4 layers, hidden 512, 16 experts, vocab 32000, ~250 MB fp32) for the bandwidths.
Each world size (1, 2, 4 ranks) is one torchrun job on gloo running its layouts in turn:

* train step: median seconds of ``policy.train_step`` (after one warm-up step) on --rows rows of
  --seq tokens, micro-batches of --micro-batch rows; log-probs: median of ``policy.logprobs`` on
  the same rows. Ratios are against TP1 of the same run.
* HF load: seconds of ``load_policy`` of the medium model (build + streaming safetensors read of
  this rank's slices + wrapping), slowest rank, per GB of checkpoint.
* bucket stream, export: GB/s of iterating ``policy.hf_weight_buckets(64 MiB)`` (TP/EP gathers,
  broadcasts to every rank) over the medium model; import (TP1 job only): GB/s of copying the
  stream into preallocated tensors under the checkpoint's names (what a rollout engine's
  load_weights does after its name mapping).

* loss head (one rank, the medium model, --head-rows rows of --head-seq tokens, the last 3/4 the
  completion, micro-batches of --head-budget tokens): ``train_step(loss_head="fused")`` (the
  policy's loss from the final hidden states through r1mega.ops.linear_grpo_loss, never the
  logits) against ``loss_head="logits"`` (the [rows, T, V] logits through
  r1mega.ops.vocab_parallel_grpo_loss, the step before the fused head), interleaved in the same
  process after a warm-up step of each: median seconds, and the peak memory a step adds above
  what was resident before it (CUDA: ``max_memory_allocated``; CPU: the kernel's resident
  high-water mark, reset through /proc/self/clear_refs, with glibc returning every block of
  64 KiB or more to the system on free, so the mark follows the live tensors).

On 2 cores the multi-rank layouts are oversubscribed (4 processes on 2 cores): the ratios measure
the communication and scheduling overhead of a layout, not a speed-up. One JSON line per layout
and metric, with environment info, is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_jsonl, environment, run_torchrun

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.05, num_hidden_layers=3,
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
            n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, norm_topk_prob=True)
MEDIUM = dict(TINY, vocab_size=32000, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
              num_key_value_heads=8, num_hidden_layers=4, moe_intermediate_size=256, n_routed_experts=16,
              kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)

LAYOUTS = {  # name -> (world size, ParallelConfig kwargs)
    "tp1": (1, {}),
    "tp2": (2, dict(tp=2)),
    "ep2": (2, dict(ep=2)),
    "pp2": (2, dict(pp=2, pp_first_stage_layers=1)),
    "tp2ep2": (4, dict(tp=2, ep=2)),
    "tp2pp2": (4, dict(tp=2, pp=2, pp_first_stage_layers=1)),
}
BUCKET_BYTES = 64 << 20


def build_model(config: dict, out: Path, seed: int) -> int:
    """save_pretrained a random DeepSeek-V3 of `config` into `out`; return its safetensors bytes."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config)).float().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Worker (one torchrun job per world size)
# ---------------------------------------------------------------------------------------------
def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from r1mega.algo import LossSpec
    from r1mega.config import OptimConfig
    from r1mega.models import load_policy
    from r1mega.parallel import ParallelConfig, destroy_parallel

    models = Path(args.models)
    results = []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (args.rows, args.seq), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    cm = am.clone()
    cm[:, : args.seq // 4] = False
    adv = torch.randn(args.rows, generator=g)
    for name in args.layouts.split(","):
        world, kwargs = LAYOUTS[name]
        parallel = ParallelConfig(**kwargs)
        row = {"layout": name, "world": world}

        policy = load_policy(models / "tiny", parallel=parallel, optim=OptimConfig(lr=1e-5, adam_eps=1e-3),
                             micro_batch_size=args.micro_batch)
        times = []
        for _ in range(args.repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            logp = policy.logprobs(ids, am)
            times.append(time.perf_counter() - t0)
        row["logprobs_s"] = statistics.median(times[1:])
        batch = dict(input_ids=ids, attention_mask=am, completion_mask=cm, old_logp=logp, advantages=adv,
                     ref_logp=logp)
        times = []
        for _ in range(args.repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            policy.train_step(batch, LossSpec(kl_coef=0.01))
            times.append(time.perf_counter() - t0)
        row["train_step_s"] = statistics.median(times[1:])
        del policy

        dist.barrier()
        t0 = time.perf_counter()
        policy = load_policy(models / "medium", parallel=parallel, trainable=False)
        elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        row["hf_load_s"] = float(elapsed)
        row["hf_load_s_per_gb"] = float(elapsed) / (args.medium_bytes / 1e9)

        hf_params = None
        if world == 1:  # the receiving engine's parameters, preallocated under the checkpoint's names
            from r1mega.models.hf_mapping import expected_hf_tensors
            from r1mega.models.safetensors_io import ST_DTYPES

            hf_params = {name: torch.empty(shape, dtype=ST_DTYPES[policy.hf_dtypes[name]])
                         for name, shape in expected_hf_tensors(policy.desc).items()}
        dist.barrier()
        t0 = time.perf_counter()
        streamed, import_s, buckets = 0, 0.0, 0
        for bucket in policy.hf_weight_buckets(BUCKET_BYTES):
            buckets += 1
            streamed += sum(t.numel() * t.element_size() for _, t in bucket)
            if hf_params is not None:
                t1 = time.perf_counter()
                with torch.no_grad():
                    for hf_name, tensor in bucket:
                        hf_params[hf_name].copy_(tensor)
                import_s += time.perf_counter() - t1
        elapsed = torch.tensor(time.perf_counter() - t0 - import_s, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        row.update(bucket_bytes=streamed, buckets=buckets, bucket_export_s=float(elapsed),
                   bucket_export_gb_per_s=streamed / 1e9 / float(elapsed))
        if hf_params is not None:
            row.update(bucket_import_s=import_s, bucket_import_gb_per_s=streamed / 1e9 / import_s)
        del policy, hf_params
        results.append(row)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    destroy_parallel(process_group=True)


def _resident_bytes(field: str) -> int:
    import re

    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def step_peak_bytes(fn) -> tuple[float, int]:
    """(seconds, peak bytes above the memory in use before) of one call of `fn`."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    before = _resident_bytes("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, _resident_bytes("VmHWM") - before


def head_worker(args) -> None:
    """Fused vs full-logits loss head on one rank (see the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from r1mega.algo import LossSpec
    from r1mega.config import OptimConfig
    from r1mega.models import load_policy
    from r1mega.parallel import ParallelConfig, destroy_parallel

    policy = load_policy(Path(args.models) / "medium", parallel=ParallelConfig(),
                         optim=OptimConfig(lr=1e-6, adam_eps=1e-3))
    g = torch.Generator().manual_seed(0)
    rows, seq = args.head_rows, args.head_seq
    ids = torch.randint(0, MEDIUM["vocab_size"], (rows, seq), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    cm = am.clone()
    cm[:, : seq // 4] = False
    logp = policy.logprobs(ids, am, micro_batch_tokens=args.head_budget)
    batch = dict(input_ids=ids, attention_mask=am, completion_mask=cm, old_logp=logp,
                 advantages=torch.randn(rows, generator=g), ref_logp=logp)
    heads = ("fused", "logits")
    samples = {h: [] for h in heads}
    for repeat in range(args.repeats + 1):  # the first round warms up (optimizer state, allocator)
        for head in heads:
            seconds, peak = step_peak_bytes(
                lambda: policy.train_step(batch, LossSpec(kl_coef=0.01), micro_batch_tokens=args.head_budget,
                                          loss_head=head))
            if repeat:
                samples[head].append((seconds, peak))
    out = [{"head": h, "train_step_s": statistics.median(s for s, _ in samples[h]),
            "step_peak_bytes": max(p for _, p in samples[h]),
            "memory": "cuda max_memory_allocated" if torch.cuda.is_available() else "cpu resident high-water mark"}
           for h in heads]
    Path(args.result).write_text(json.dumps(out))
    destroy_parallel(process_group=True)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--head-rows", type=int, default=8)
    ap.add_argument("--head-seq", type=int, default=256)
    ap.add_argument("--head-budget", type=int, default=1024, help="micro-batch tokens of the loss-head steps")
    ap.add_argument("--skip-layouts", action="store_true", help="only the loss-head comparison")
    ap.add_argument("--out", default=str(RESULTS / "bench_policy.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--head-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    ap.add_argument("--medium-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.head_worker:
        head_worker(args)
        return 0

    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or "tp1" not in names:
        ap.error(f"--layouts: unknown {unknown}; tp1 (the baseline) is required")
    env = environment()
    rows, heads = [], []
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        tmp = Path(tmp)
        build_model(TINY, tmp / "tiny", seed=0)
        medium_bytes = build_model(MEDIUM, tmp / "medium", seed=1)
        print(f"medium model: {medium_bytes / 1e6:.0f} MB of safetensors")
        for world in [] if args.skip_layouts else sorted({LAYOUTS[n][0] for n in names}):
            group = [n for n in names if LAYOUTS[n][0] == world]
            result = tmp / f"result-{world}.json"
            t0 = time.perf_counter()
            run_torchrun(__file__, world, ["--worker", "--models", str(tmp), "--layouts", ",".join(group),
                                           "--medium-bytes", str(medium_bytes), "--result", str(result),
                                           "--rows", str(args.rows), "--seq", str(args.seq),
                                           "--micro-batch", str(args.micro_batch), "--repeats", str(args.repeats)])
            print(f"world {world}: {', '.join(group)} in {time.perf_counter() - t0:.0f} s")
            rows += json.loads(result.read_text())
        result = tmp / "result-heads.json"
        t0 = time.perf_counter()
        run_torchrun(__file__, 1, ["--head-worker", "--models", str(tmp), "--result", str(result),
                                   "--head-rows", str(args.head_rows), "--head-seq", str(args.head_seq),
                                   "--head-budget", str(args.head_budget), "--repeats", str(args.repeats)],
                     env={"MALLOC_MMAP_THRESHOLD_": str(64 << 10)})
        print(f"loss heads in {time.perf_counter() - t0:.0f} s")
        heads = json.loads(result.read_text())

    out = []
    if rows:
        base = next(r for r in rows if r["layout"] == "tp1")
        print(f"\nDeepSeek-V3 tiny: {args.rows} rows x {args.seq} tokens, micro-batch {args.micro_batch}; "
              f"medium: {medium_bytes / 1e6:.0f} MB; bucket {BUCKET_BYTES >> 20} MiB")
        header = (f"{'layout':<8} {'ranks':>5} {'train s':>8} {'x tp1':>6} {'logp s':>8} {'x tp1':>6} "
                  f"{'load s/GB':>9} {'export GB/s':>11} {'import GB/s':>11}")
        print(header)
        print("-" * len(header))
        for r in rows:
            r["train_step_ratio"] = r["train_step_s"] / base["train_step_s"]
            r["logprobs_ratio"] = r["logprobs_s"] / base["logprobs_s"]
            imp = f"{r['bucket_import_gb_per_s']:.2f}" if "bucket_import_gb_per_s" in r else "-"
            print(f"{r['layout']:<8} {r['world']:>5} {r['train_step_s']:>8.3f} {r['train_step_ratio']:>6.2f} "
                  f"{r['logprobs_s']:>8.3f} {r['logprobs_ratio']:>6.2f} {r['hf_load_s_per_gb']:>9.2f} "
                  f"{r['bucket_export_gb_per_s']:>11.2f} {imp:>11}")
            out.append({"bench": "bench_policy", "model": "deepseek_v3", "rows": args.rows, "seq": args.seq,
                        "micro_batch": args.micro_batch, "repeats": args.repeats, "medium_bytes": medium_bytes,
                        "bucket_budget": BUCKET_BYTES, **r, **env})

    fused = next(h for h in heads if h["head"] == "fused")
    print(f"\nloss head, DeepSeek-V3 medium (vocab {MEDIUM['vocab_size']}), tp1: {args.head_rows} rows x "
          f"{args.head_seq} tokens, micro-batches of {args.head_budget} tokens; peak: {fused['memory']}")
    header = f"{'head':<8} {'train s':>8} {'x fused':>8} {'step peak MB':>13} {'x fused':>8}"
    print(header)
    print("-" * len(header))
    for h in heads:
        h["train_step_ratio"] = h["train_step_s"] / fused["train_step_s"]
        h["step_peak_ratio"] = h["step_peak_bytes"] / max(fused["step_peak_bytes"], 1)
        print(f"{h['head']:<8} {h['train_step_s']:>8.3f} {h['train_step_ratio']:>8.2f} "
              f"{h['step_peak_bytes'] / 1e6:>13.1f} {h['step_peak_ratio']:>8.2f}")
        out.append({"bench": "bench_policy_loss_head", "model": "deepseek_v3_medium", "vocab": MEDIUM["vocab_size"],
                    "rows": args.head_rows, "seq": args.head_seq, "micro_batch_tokens": args.head_budget,
                    "repeats": args.repeats, **h, **env})
    append_jsonl(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
