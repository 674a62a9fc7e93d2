"""The R1 stages on more than one base: the cold start keeps (or raises) the base model's held-out
accuracy and gives it the R1 format, and stage 2 trains from it, on two bases pretrained with
different seeds. A small, fast version of what ``benchmarks/bench_pipeline_bases.py`` shows over
whole pipelines (benchmarks/results/r1_pipeline_bases_table.txt).

The bases are the embedded default's model and corpus pretrained for fewer steps, one thread; the
stages run their own recipes (tiny-cold-start, tiny-reasoning-rl, tiny-r1-eval) as ``r1mega
pipeline`` runs them, shortened where noted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1mega.data import r1_corpus
from r1mega.data.loader import write_prompts
from tests.trainer_helpers import r1mega

PRETRAIN_STEPS = 300
HELDOUT = 40  # held-out problems, English and Chinese alternately
COLD_START_STEPS = 80  # of tiny-cold-start's 174 (2 epochs of 2000 examples)


def _run(*args: str) -> None:
    proc = r1mega(*args, "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _evaluate(model: Path, data: Path, out: Path) -> dict:
    """R1's evaluation (recipe tiny-r1-eval's protocol: T 0.6, top-p 0.95, 96 tokens, the summary
    format) with 2 samples per problem and greedy."""
    _run("eval", "--model", str(model), "--data", str(data), "--out", str(out), "--samples", "2",
         "--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "96", "--format-style", "summary")
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("seed", [0, 1])
def test_the_cold_start_keeps_the_base_accuracy_and_stage_2_trains_from_it(tmp_path, seed, record_property):
    base = tmp_path / "base"
    _run("pretrain", "--set", f"pretrain.out={base}", "--set", f"pretrain.steps={PRETRAIN_STEPS}",
         "--set", f"pretrain.seed={seed}", "--set", "pretrain.threads=1")
    heldout, train = tmp_path / "heldout.jsonl", tmp_path / "train.jsonl"
    write_prompts(heldout, r1_corpus.problems("test", HELDOUT))
    write_prompts(train, r1_corpus.problems("train", 64))
    before = _evaluate(base, heldout, tmp_path / "eval-base")

    _run("sft", "--recipe", "tiny-cold-start", "--model", str(base), "--set", f"run.out_dir={tmp_path}",
         "--set", "run.name=cold", "--set", f"sft.max_steps={COLD_START_STEPS}")
    cold = _evaluate(tmp_path / "cold" / "final", heldout, tmp_path / "eval-cold")

    _run("train", "--recipe", "tiny-reasoning-rl", "--model", str(tmp_path / "cold" / "final"), "--data", str(train),
         "--heldout", str(heldout), "--set", f"run.out_dir={tmp_path}", "--set", "run.name=stage2",
         "--set", "run.steps=2", "--set", "eval.max_prompts=8", "--set", "run.save_every=0")
    stage2 = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    figures = {"base pass@1": before["pass_at_1"], "base format": before["format_rate"],
               "cold start pass@1": cold["pass_at_1"], "cold start format": cold["format_rate"],
               "stage 2 steps": stage2["steps"]}
    record_property("figures", json.dumps({f"seed {seed}": figures}))
    assert cold["format_rate"] > max(0.8, before["format_rate"]), figures
    assert cold["pass_at_1"] >= before["pass_at_1"], figures
    assert stage2["steps"] == 2, stage2
