"""Golden metrics: today's numbers of the tiny recipes, pinned from one commit to the next.

Four runs, each as a user starts it (``r1mega pretrain``/``train``/``sft`` subprocesses, one thread,
no compile), on the test base model (the embedded default's recipe pretrained for 40 steps):

* ``base``: the base model itself (a hash of its weights), so that a change in pretraining is told
  apart from a change in the trainer;
* ``grpo-tiny``: the ``tiny`` recipe for 5 steps (a dense digit-share reward beside accuracy and
  format, since the barely pretrained base scores 0 on both and would train nothing), with the
  held-out evaluation before and after on 8 problems;
* ``grpo-offpolicy`` and ``grpo-gspo``: the same with the loss options away from their defaults
  (2 mini-batches, so the ratio leaves 1 and clipping happens; clip-higher, dual clip, k1+ KL
  clamped, token-mean, TIS, dynamic sampling, a moving reference, the soft overlong penalty; and
  GSPO's sequence ratio, Dr. GRPO's constant normaliser and unscaled advantages, k2, the engine's
  log-probs as the old ones, overlong masking);
* ``sft-cold-start``: the ``tiny-cold-start`` recipe's first 5 steps.

Every metric that is not a timing is kept, and ``tests/test_golden_metrics.py`` asserts that the
code reproduces ``tests/golden/metrics.json`` bit for bit. Bits depend on the machine's kernels
(the CPU's vector unit and vendor, the torch build): the file holds one entry per machine, told
apart by the hash of the test base's weights, and the test compares the entry of the machine it
runs on (and skips, saying so, on a machine no entry was recorded on). A change that moves
numerics regenerates this machine's entry in its own commit, with the reason recorded in it; the
other machines' entries lose the runs it moves (``--moved``), which only they can record again::

    python -m tests.golden_metrics --reason "why the numbers moved" [--moved sft-cold-start ...]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import cpu_model
from r1mega.run.logs import is_timing
from tests.trainer_helpers import REPO, run_env

GOLDEN = REPO / "tests" / "golden" / "metrics.json"

BASE_STEPS, BASE_BATCH = 40, 8
GRPO_COMMON = ["run.steps=5", "run.eval_every=0", "run.eval_max_prompts=8", "run.eval_samples=2",
               "run.save_every=0", "rewards.workers=1", "rewards.custom=tests.rewards_custom:digit_share"]
RUNS: dict[str, list[str]] = {
    "grpo-tiny": ["train", "--recipe", "tiny", *(a for s in GRPO_COMMON for a in ("--set", s))],
    "grpo-offpolicy": ["train", "--recipe", "tiny", *(a for s in GRPO_COMMON + [
        "batch.minibatches_per_step=2", "grpo.eps_high=0.28", "grpo.dual_clip=3.0", "grpo.kl_estimator=k1+",
        "grpo.kl_clamp=10.0", "grpo.agg=token-mean", "grpo.tis=true", "grpo.tis_cap=2.0",
        "grpo.dynamic_sampling=true", "grpo.overlong=soft", "grpo.overlong_buffer=8",
        "grpo.ref_update_interval=3"] for a in ("--set", s))],
    "grpo-gspo": ["train", "--recipe", "tiny", *(a for s in GRPO_COMMON + [
        "batch.minibatches_per_step=2", "grpo.ratio_level=sequence", "grpo.agg=seq-mean-token-sum-norm",
        "grpo.norm_length=48", "grpo.adv_scale=none", "grpo.kl_estimator=k2", "grpo.old_logp=rollout",
        "grpo.tis=false", "grpo.tis_cap=none", "grpo.overlong=mask"] for a in ("--set", s))],
    "sft-cold-start": ["sft", "--recipe", "tiny-cold-start", "--set", "sft.max_steps=5"],
}
def _numbers(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in rows]


def build_base(out: Path) -> Path:
    """The test base model, pretrained with one thread (the same bits on any core count)."""
    code = ("import sys; from r1mega.run.base_model import PretrainSpec, pretrain_base_model; "
            f"pretrain_base_model(sys.argv[1], PretrainSpec(steps={BASE_STEPS}, batch_size={BASE_BATCH}, threads=1), "
            "progress=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=run_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def weights_hash(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def collect(work: Path, names: tuple[str, ...] = tuple(RUNS), base: Path | None = None) -> dict:
    """Run the golden jobs under `work`, side by side (each is one thread), on `base` (a model
    :func:`build_base` made; None: build one under `work`); {"base": hash, run name: {"metrics":
    [...], "eval": [...]}}."""
    base = base if base is not None else build_base(work / "base")
    result: dict = {"base": weights_hash(base)}
    procs = {}
    for name in names:
        args = [*RUNS[name], "--quiet", "--model", str(base), "--set", f"run.out_dir={work}",
                "--set", f"run.name={name}"]
        procs[name] = subprocess.Popen([sys.executable, "-m", "r1mega.cli", *args], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=run_env())
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-4000:]}"
        run = work / name
        result[name] = {"metrics": _numbers(run / "metrics.jsonl"), "eval": _numbers(run / "eval.jsonl")}
    return result


def environment() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(),
            "commit": commit.strip(), "date": datetime.date.today().isoformat()}


def load() -> dict:
    """{"machines": [entry, ...]}, each entry {"reason", "environment", "runs"} recorded on one
    machine; runs["base"] (the test base's weights hash) tells whose kernels an entry holds."""
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"machines": []}


def entry_for(doc: dict, base_hash: str) -> dict | None:
    """The entry recorded on a machine whose kernels pretrain the test base to `base_hash`."""
    return next((e for e in doc["machines"] if e["runs"].get("base") == base_hash), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate tests/golden/metrics.json (its own commit, with why).")
    parser.add_argument("--reason", required=True, help="why the numbers moved (kept in the file)")
    parser.add_argument("--moved", nargs="+", choices=sorted(RUNS), default=sorted(RUNS),
                        help="the runs whose numbers this change moves (default: all); other machines' entries "
                             "lose them, since only their own machine can record them again")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = collect(Path(tmp))
    doc = load()
    others = []
    for e in doc["machines"]:
        if e["runs"].get("base") == runs["base"]:
            continue  # this machine's entry: replaced
        kept = {k: v for k, v in e["runs"].items() if k not in args.moved}
        if set(kept) - {"base"}:
            dropped = sorted(set(e["runs"]) - set(kept))
            e = {**e, "runs": kept}
            if dropped:
                e["dropped"] = e.get("dropped", []) + [{"runs": dropped, "reason": args.reason}]
            others.append(e)
    doc = {"note": "one entry per machine whose kernels give other bits (told apart by the test base's "
                   "weights hash, runs.base); the test compares the entry of the machine it runs on",
           "machines": [{"reason": args.reason, "environment": environment(), "runs": runs}, *others]}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {GOLDEN}: this machine's entry (test base {runs['base']}) and {len(others)} other(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
