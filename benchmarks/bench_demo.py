"""The main job, measured: `r1mega train` on the embedded tiny default, then the base model and the
trained one re-evaluated with plain transformers generation (not r1mega's engine or rewards path).

    python benchmarks/bench_demo.py [--run RUN_DIR] [--samples 4] [--out PATH]

Without --run it runs ``python -m r1mega.cli train --set run.out_dir=<tmp>`` (the README's main
command without the setup) and times it. Then, for the run's ``summary.json``: every held-out
prompt of ``heldout.jsonl`` is generated --samples times at temperature 0.6, top-p 0.95 (the R1
paper's pass@1 protocol) by ``transformers``' ``model.generate`` from ``base_model`` and from
``final_model``, and each completion's ``<answer>`` is checked by math-verify directly. One JSON line
with the trainer's figures and both re-evaluations, plus the environment, goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, append_jsonl, environment


def transformers_pass_at_1(model_dir: str, prompts: list[dict], samples: int, max_new_tokens: int, seed: int) -> dict:
    import torch
    import transformers
    from math_verify import parse, verify

    from r1mega.rewards.base import last_tag_block
    from r1mega.templates import r1_zero_prompt

    torch.manual_seed(seed)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok.padding_side = "left"
    right = total = formatted = 0
    for start in range(0, len(prompts), 16):
        chunk = prompts[start:start + 16]
        enc = tok([r1_zero_prompt(p["prompt"]) for p in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=0.6, top_p=0.95, top_k=0,
                                 num_return_sequences=samples, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in enumerate(texts):
            gold = chunk[i // samples]["answer"]
            answer = last_tag_block(text, "<answer>", "</answer>")
            formatted += answer is not None
            right += bool(answer is not None and verify(parse(gold), parse(answer)))
            total += 1
    return {"pass_at_1": right / total, "answer_tag_rate": formatted / total, "completions": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="an existing run directory (skip training)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS / "bench_demo.jsonl"))
    args = ap.parse_args(argv)
    env = environment()
    train_s = None
    tmp = None
    if args.run:
        run = Path(args.run)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-demo-")
        cmd = [sys.executable, "-m", "r1mega.cli", "train", "--set", f"run.out_dir={tmp}"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "2", "TORCH_COMPILE_DISABLE": "1"})
        train_s = time.perf_counter() - t0
        run = Path(tmp) / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    prompts = [json.loads(line) for line in Path(summary["heldout_file"]).read_text().splitlines()]
    new = config["rollout"]["max_new_tokens"]
    base = transformers_pass_at_1(summary["base_model"], prompts, args.samples, new, seed=0)
    final = transformers_pass_at_1(summary["final_model"], prompts, args.samples, new, seed=0)
    row = {"bench": "bench_demo", "command": "r1mega train (recipe tiny)", "train_wall_s": train_s,
           "trainer_wall_s": summary["wall_s"], "steps": summary["steps"],
           "trainer_heldout_before": summary["heldout_accuracy_before"],
           "trainer_heldout_after": summary["heldout_accuracy_after"],
           "trainer_gain_points": 100 * (summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"]),
           "transformers_base": base, "transformers_final": final,
           "transformers_gain_points": 100 * (final["pass_at_1"] - base["pass_at_1"]),
           "heldout_prompts": len(prompts), "samples_per_prompt": args.samples,
           "phase_seconds": summary["phase_seconds"], **env}
    print(f"trainer: held-out pass@1 {row['trainer_heldout_before']:.3f} -> {row['trainer_heldout_after']:.3f} "
          f"({row['trainer_gain_points']:+.1f} points) in {summary['wall_s']:.0f} s")
    print(f"plain transformers: base {base['pass_at_1']:.3f} -> final {final['pass_at_1']:.3f} "
          f"({row['transformers_gain_points']:+.1f} points), {len(prompts)} prompts x {args.samples}")
    append_jsonl(args.out, [row])
    if tmp is not None:
        import shutil

        shutil.copy(run / "curves.png", RESULTS / "demo_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
