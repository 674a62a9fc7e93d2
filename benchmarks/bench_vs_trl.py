"""r1mega vs TRL, like for like: ``r1mega train`` and TRL's ``GRPOTrainer`` on the same tiny model,
prompts, hyper-parameters, loss, rewards and CPU, one after the other in one run.

    python benchmarks/bench_vs_trl.py [--steps 60] [--prompts 8] [--group 8] [--max-new-tokens 48]
                                      [--threads 1] [--old-logp rollout] [--skip-install] [--out PATH]

* Model: the embedded default base (Qwen3-MoE, 4 layers, hidden 128; built into ~/.cache/r1mega
  by ``r1mega pretrain`` when absent), fp32 on both sides.
* Data: the embedded two-digit additions (train split) in the R1-Zero template; TRL gets the same
  prompt strings in the order r1mega's sampler hands them out, and the driver checks that TRL's
  tokens and per-step prompts equal r1mega's.
* Settings: the ``tiny`` recipe's (G = 8 of 8 prompts, one optimizer step per rollout, completions
  of at most 48 tokens at temperature 1, lr 5e-5 after 5 linear warm-up steps then constant, Adam
  0.9/0.95/1e-8, no weight decay, clip 1.0, k3 KL 0.001 to the base) with the loss of TRL's
  ``loss_type="grpo"`` (the trl-grpo recipe's knobs: seq-mean-token-mean, std eps 1e-4, no
  truncated importance sampling); ``trl_match.py`` maps one onto the other and the driver checks
  what ``GRPOConfig`` made of it. Rewards: accuracy + format, r1mega's functions on both sides.
* TRL 1.16.0 is installed into build/trl-venv (``--system-site-packages``, torch pinned to this
  interpreter's version by a constraints file, so pip cannot pull another torch).
* Measured for both (same method): seconds per step (median and total, the step's phases),
  generated tokens/s (completion tokens / rollout seconds), training tokens/s (prompt + completion
  tokens / train-phase seconds), end-to-end tokens/s (completion tokens / the steps' seconds), the
  peak RSS of the process tree (psutil, sampled every 0.1 s), the load average before and after;
  then held-out pass@1 of the base and both final models by ``r1mega eval``'s code (same
  prompts, 4 samples at T 0.6, top-p 0.95, same seed, same reward code).

Prints two tables (figures; phase breakdown) and appends one JSON line with the environment to
--out (default benchmarks/results/bench_vs_trl.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO, RESULTS, append_jsonl, environment, print_table
from trl_match import Settings, r1mega_config, spec_file, step_prompts

TRL_VERSION = "1.16.0"  # newest on PyPI (2026-12); requires transformers >= 4.56.2
VENV = REPO / "build" / "trl-venv"
R1MEGA_PHASES = ("time_refit", "time_eval", "time_rollout", "time_reward", "time_sleep", "time_logprobs", "time_train")
TRL_PHASES = ("rollout", "reward", "logprobs", "score_other", "train")


class BenchError(RuntimeError):
    """A failed step of the benchmark; one line."""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_trl(venv: Path, *, install: bool) -> str:
    """TRL in `venv` over this interpreter's packages, with this interpreter's torch; its version."""
    import torch

    py = venv_python(venv)
    if install:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__}\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), f"trl=={TRL_VERSION}"],
                       check=True)
    elif not py.exists():
        raise BenchError(f"--skip-install: {venv} has no python; run once without --skip-install")
    probe = subprocess.run([str(py), "-c", "import torch, trl; print(torch.__version__, trl.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        raise BenchError(f"{py}: cannot import torch and trl ({probe.stderr.strip().splitlines()[-1:]})")
    venv_torch, trl_version = probe.stdout.split()
    if venv_torch != torch.__version__:
        raise BenchError(f"{venv}: torch {venv_torch}, not this interpreter's {torch.__version__}")
    return trl_version


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd`, sampling the RSS of its process tree every 0.1 s; wall seconds, peak RSS (MiB),
    load averages before and after. Its output goes to `log`; a failure raises with the tail."""
    import psutil

    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peak, done = 0, threading.Event()

        def sample():
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    total = 0
                    for p in tree:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak = max(peak, total)
                except psutil.Error:
                    pass
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if code:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {code}; log {log}:\n" + "\n".join(tail))
    return {"process_wall_s": wall, "peak_rss_mb": peak / 2**20, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()}


def side_figures(step_seconds, completion_tokens, prompt_tokens, rollout_s, train_s, phases) -> dict:
    """The compared figures of one side from its per-step lists and phase totals."""
    total = sum(step_seconds)
    completion, trained = sum(completion_tokens), sum(completion_tokens) + sum(prompt_tokens)
    return {
        "step_s_median": statistics.median(step_seconds), "step_s_total": total, "step_s": step_seconds,
        "completion_tokens": completion, "prompt_tokens": sum(prompt_tokens),
        "generated_tokens_per_s": completion / rollout_s, "train_tokens_per_s": trained / train_s,
        "end_to_end_tokens_per_s": completion / total, "phase_s": phases,
    }


def r1mega_side(run_dir: Path, cfg, prompt_lengths: list[int]) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != cfg.run.steps:
        raise BenchError(f"{run_dir}/metrics.jsonl: {len(rows)} steps, expected {cfg.run.steps}")
    completion = [round(r["response_length_mean"] * r["sequences"]) for r in rows]
    prompt = [n * cfg.grpo.group_size for n in prompt_lengths]
    phases = {k[5:]: sum(r.get(k, 0.0) for r in rows) for k in R1MEGA_PHASES}
    out = side_figures([r["seconds"] for r in rows], completion, prompt, phases["rollout"], phases["train"], phases)
    out["train_accuracy"] = [r["accuracy"] for r in rows]
    out["train_reward"] = [r["reward_mean"] for r in rows]
    return out


def trl_side(timings: dict) -> dict:
    steps = timings["steps"]
    phases = {k: sum(s[k] for s in steps) for k in TRL_PHASES}
    phases["train.optimizer"] = sum(s["optimizer"] for s in steps)
    out = side_figures([s["seconds"] for s in steps], [s["completion_tokens"] for s in steps],
                       [s["prompt_tokens"] for s in steps], phases["rollout"], phases["train"], phases)
    out["train_accuracy"] = timings["train_accuracy"]
    out["train_reward"] = timings["train_reward"]
    return out


def evaluate(model_dir: str | Path, records, s: Settings, max_new_tokens: int) -> dict:
    """pass@1 by r1mega eval's code: the same prompts, sampling and rewards for every model."""
    from r1mega.evaluation import EvalSettings, evaluate_model

    settings = EvalSettings(samples=s.eval_samples, temperature=0.6, top_p=0.95, max_new_tokens=max_new_tokens,
                            greedy=False, seed=s.seed)
    summary = evaluate_model(model_dir, records, settings, progress=False)["summary"]
    return {k: summary[k] for k in ("pass_at_1", "format_rate", "response_length_mean", "problems", "seconds")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--prompts", type=int, default=defaults.prompts, help="prompts per step")
    ap.add_argument("--group", type=int, default=defaults.group, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    ap.add_argument("--threads", type=int, default=defaults.threads, help="OMP_NUM_THREADS and torch threads of both runs")
    ap.add_argument("--heldout-prompts", type=int, default=defaults.heldout_prompts)
    ap.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--old-logp", default=defaults.old_logp, help="r1mega's grpo.old_logp: rollout (default; TRL "
                    "takes the current policy's detached log-probs, no extra pass) or recompute")
    ap.add_argument("--skip-install", action="store_true", help=f"use the existing {VENV.relative_to(REPO)}")
    ap.add_argument("--venv", default=str(VENV))
    ap.add_argument("--work", help="directory for both runs (default: a new temporary one)")
    ap.add_argument("--out", default=str(RESULTS / "bench_vs_trl.jsonl"))
    args = ap.parse_args(argv)
    try:
        s = Settings(steps=args.steps, prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, threads=args.threads, heldout_prompts=args.heldout_prompts,
                     eval_samples=args.eval_samples, old_logp=args.old_logp)
        return run(s, args)
    except (BenchError, ValueError) as err:
        print(f"bench_vs_trl: {err}", file=sys.stderr)
        return 1


def run(s: Settings, args: argparse.Namespace) -> int:
    import transformers

    from r1mega.data import base_corpus
    from r1mega.data.loader import write_prompts
    from r1mega.run.base_model import ensure_base_model
    from r1mega.templates import render_prompts

    trl_version = ensure_trl(Path(args.venv), install=not args.skip_install)
    base = ensure_base_model()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    records = base_corpus.problems("train", seed=s.seed)
    write_prompts(data, records)
    cfg = r1mega_config(s, out_dir=work, name="r1mega", data=data)
    cfg.save(work)
    spec = spec_file(work / "trl_spec.json", settings=s, cfg=cfg, base_model=base, data=data, out_dir=work / "trl")
    (work / "trl").mkdir(exist_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
    prompt_lengths = [sum(len(ids) for ids in render_prompts(batch, tokenizer, cfg.run.template,
                                                             cfg.rollout.max_prompt_tokens))
                      for batch in step_prompts(records, cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "TORCH_COMPILE_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    print(f"r1mega train: {s.steps} steps of {s.prompts} prompts x G={s.group}, {s.max_new_tokens} new tokens "
          f"({work / 'r1mega'})", flush=True)
    r1_proc = run_measured([sys.executable, "-m", "r1mega.cli", "train", "--config", str(work / "config.json")],
                           env, work / "r1mega.log")
    r1 = {**r1mega_side(work / "r1mega", cfg, prompt_lengths), **r1_proc}
    print(f"TRL {trl_version} GRPOTrainer: same job ({work / 'trl'})", flush=True)
    trl_proc = run_measured([str(venv_python(Path(args.venv))), str(Path(__file__).with_name("trl_driver.py")),
                             str(spec)], env, work / "trl.log")
    timings = json.loads((work / "trl" / "trl_timings.json").read_text())
    if not timings["prompts_as_r1mega"]:
        raise BenchError("TRL's steps did not get the prompts r1mega's sampler handed out")
    trl = {**trl_side(timings), **trl_proc, "setup_s": timings["setup_s"], "driver_wall_s": timings["process_wall_s"]}

    heldout = base_corpus.problems("test", s.heldout_prompts, seed=s.seed)
    print(f"held-out pass@1: {len(heldout)} prompts x {s.eval_samples} samples, base and both final models",
          flush=True)
    summary = json.loads((work / "r1mega" / "summary.json").read_text())
    accuracy = {"base": evaluate(base, heldout, s, s.max_new_tokens),
                "r1mega": evaluate(summary["final_model"], heldout, s, s.max_new_tokens),
                "trl": evaluate(timings["final_model"], heldout, s, s.max_new_tokens)}
    r1["heldout"], trl["heldout"] = accuracy["r1mega"], accuracy["trl"]
    ratio = r1["end_to_end_tokens_per_s"] / trl["end_to_end_tokens_per_s"]
    report(s, r1, trl, accuracy["base"], ratio, trl_version)
    append_jsonl(args.out, [{
        "bench": "bench_vs_trl", **environment(), "trl": trl_version, "transformers": transformers.__version__,
        "settings": s.to_dict(), "config": cfg.to_dict(), "trl_grpo_config": timings["grpo_config"],
        "r1mega": r1, "trl_run": trl, "base_heldout": accuracy["base"],
        "ratio_end_to_end_tokens_per_s": ratio,
        "ratio_step_s_median": trl["step_s_median"] / r1["step_s_median"],
        "goal": "r1mega >= 1.5x TRL end-to-end tokens/s at equal or better held-out pass@1",
        "goal_met": ratio >= 1.5 and r1["heldout"]["pass_at_1"] >= trl["heldout"]["pass_at_1"],
    }])
    return 0


def report(s: Settings, r1: dict, trl: dict, base: dict, ratio: float, trl_version: str) -> None:
    sides = [dict(name="r1mega", **r1), dict(name=f"TRL {trl_version}", **trl)]
    print(f"\n{s.steps} steps, {s.prompts} prompts x G={s.group}, <= {s.max_new_tokens} new tokens, "
          f"{s.threads} threads; held-out pass@1 of the base {base['pass_at_1']:.3f}")
    print_table([
        ("side", -14, lambda r: r["name"]),
        ("step s (med)", 13, lambda r: f"{r['step_s_median']:.2f}"),
        ("steps s", 9, lambda r: f"{r['step_s_total']:.1f}"),
        ("gen tok/s", 10, lambda r: f"{r['generated_tokens_per_s']:.0f}"),
        ("train tok/s", 12, lambda r: f"{r['train_tokens_per_s']:.0f}"),
        ("e2e tok/s", 10, lambda r: f"{r['end_to_end_tokens_per_s']:.0f}"),
        ("peak RSS MB", 12, lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("pass@1", 8, lambda r: f"{r['heldout']['pass_at_1']:.3f}"),
        ("format", 8, lambda r: f"{r['heldout']['format_rate']:.3f}"),
        ("load before/after", 19, lambda r: f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"),
    ], sides)
    print(f"end-to-end tokens/s r1mega / TRL: {ratio:.2f}x (goal 1.5x); median step TRL / r1mega: "
          f"{trl['step_s_median'] / r1['step_s_median']:.2f}x\n")
    names = sorted(set(r1["phase_s"]) | set(trl["phase_s"]), key=lambda k: (k.split(".")[0], k))
    print_table([("phase (s, all steps)", -22, lambda r: r["phase"]),
                 ("r1mega", 9, lambda r: r["r1"]), ("TRL", 9, lambda r: r["trl"])],
                [{"phase": k, "r1": f"{r1['phase_s'][k]:.1f}" if k in r1["phase_s"] else "-",
                  "trl": f"{trl['phase_s'][k]:.1f}" if k in trl["phase_s"] else "-"} for k in names])


if __name__ == "__main__":
    sys.exit(main())
