"""The trainer end to end through the `r1mega` command (a subprocess per run, as a user runs it),
on a base model pretrained here in seconds (the embedded default's recipe, a few steps).

The full demo (pretraining for minutes, then `r1mega train`) is the README's main command; this
is its fast smoke version plus the invariants: on step 0 the ratio is exactly 1 and the old-vs-new
KL 0, the KL to the reference 0; the engine's log-probs match the trainer's; stopping and
resuming gives the uninterrupted run's metrics bit for bit; bad input stops the run with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1mega.trainer.logs import TIMING_KEYS

SMALL = ["run.steps=2", "run.eval_every=0", "run.eval_max_prompts=6", "run.eval_samples=2", "run.save_every=1",
         "batch.prompts_per_step=4", "grpo.group_size=4", "rollout.max_new_tokens=24", "rewards.workers=1",
         "run.samples_per_step=3"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from r1mega.trainer.pretrain import PretrainSpec, pretrain_base_model

    return pretrain_base_model(tmp_path_factory.mktemp("base") / "model", PretrainSpec(steps=40, batch_size=8),
                               progress=False)


def r1mega(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "r1mega.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def train(out: Path, name: str, model: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    args = ["train", "--quiet"]
    if resume:
        args += ["--resume", str(out / name)]
    else:
        args += ["--model", str(model)]
    for s in [f"run.out_dir={out}", f"run.name={name}", *SMALL, *sets]:
        args += ["--set", s]
    proc = r1mega(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


def test_pretrain_writes_a_transformers_model(base_model):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_model)
    tok = transformers.AutoTokenizer.from_pretrained(base_model)
    text = "User: What is 47 + 38?. Assistant: <think> 7+8=15 4+3+1=8 </think> <answer> 85 </answer>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert model.config.model_type == "qwen3_moe" and model.config.eos_token_id == tok.eos_token_id
    meta = json.loads((base_model / "pretrain.json").read_text())
    assert meta["spec"]["steps"] == 40 and meta["final_loss"] < 3.0


def test_train_runs_and_writes_the_run_directory(tmp_path, base_model):
    import transformers

    train(tmp_path, "smoke", base_model)
    run = tmp_path / "smoke"
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "heldout.jsonl", "summary.json",
                 "curves.png", "final/config.json", "final/model.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_1", "step_2"]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    first = rows[0]
    # slime's gates: the first mini-batch's ratio is exactly 1, old-vs-new KL 0, KL to the base 0
    assert first["ratio_mean"] == 1.0 and first["approx_kl"] == 0.0 and first["kl_mean"] == 0.0
    assert first["mismatch_abs_max"] < 1e-4, first["mismatch_abs_max"]
    for key in ("reward_mean", "reward_accuracy", "reward_format", "accuracy", "format_rate", "response_length_mean",
                "response_length_max", "truncation_rate", "entropy_estimate", "clip_frac_high", "grad_norm", "lr",
                "mismatch_k3", "tis_capped_frac", "rollout_tokens_per_s", "time_rollout", "time_train"):
        assert key in first, key
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all({"prompt", "completion", "reward"} <= set(s) for s in samples)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout_accuracy_after"] == evals[-1]["pass_at_1"]
    assert Path(summary["heldout_file"]).is_file() and Path(summary["base_model"]) == base_model.resolve()
    transformers.AutoModelForCausalLM.from_pretrained(summary["final_model"])
    transformers.AutoTokenizer.from_pretrained(summary["final_model"])
    assert json.loads((run / "config.json").read_text())["run"]["steps"] == 2


def test_resume_gives_the_uninterrupted_metrics(tmp_path, base_model):
    train(tmp_path, "whole", base_model, "run.steps=3")
    train(tmp_path, "split", base_model, "run.steps=2")
    train(tmp_path, "split", base_model, "run.steps=3", resume=True)
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2]
    assert deterministic(split) == deterministic(whole)


def test_bad_input_is_one_line_before_any_work(tmp_path, base_model):
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"id": "a", "prompt": "What is 1 + 1?", "task": "math", "answer": "2"}\n'
                       '{"id": "b", "prompt": 3, "task": "math", "answer": "2"}\n')
    cases = [
        (["--model", str(tmp_path / "missing")], "run.model"),
        (["--model", str(base_model), "--data", str(bad_row)], "bad.jsonl"),
        (["--model", str(base_model), "--set", "grpo.group_size=0"], "grpo.group_size"),
        (["--model", str(base_model), "--set", "rollout.enginee=hf"], "did you mean"),
        (["--resume", str(tmp_path / "nothing")], "not a run directory"),
    ]
    for args, word in cases:
        proc = r1mega("train", "--quiet", "--set", f"run.out_dir={tmp_path}", *args, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], (args, proc.stderr[-2000:])
    assert not any(p.name == "r1mega" for p in tmp_path.iterdir())
