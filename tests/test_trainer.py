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

import torch

from tests.trainer_helpers import SMALL, deterministic, metrics, r1mega, run_env, train


def test_pretrain_writes_a_transformers_model(small_base_model):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(small_base_model)
    tok = transformers.AutoTokenizer.from_pretrained(small_base_model)
    text = "User: What is 47 + 38?. Assistant: <think> 7+8=15 4+3+1=8 </think> <answer> 85 </answer>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert model.config.model_type == "qwen3_moe" and model.config.eos_token_id == tok.eos_token_id
    meta = json.loads((small_base_model / "pretrain.json").read_text())
    assert meta["spec"]["steps"] == 40 and meta["final_loss"] < 3.0


def test_train_runs_and_writes_the_run_directory(tmp_path, small_base_model):
    import transformers

    train(tmp_path, "smoke", small_base_model)
    run = tmp_path / "smoke"
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "heldout.jsonl", "summary.json",
                 "curves.png", "final/config.json", "final/model.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    from r1mega.models import list_checkpoints

    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
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
    assert Path(summary["heldout_file"]).is_file() and Path(summary["base_model"]) == small_base_model.resolve()
    transformers.AutoModelForCausalLM.from_pretrained(summary["final_model"])
    transformers.AutoTokenizer.from_pretrained(summary["final_model"])
    assert json.loads((run / "config.json").read_text())["run"]["steps"] == 2


def _run_until_killed(out: Path, name: str, model: Path, moment: str, resume: bool = False) -> None:
    """Start a 3-step run and SIGKILL it at `moment`: "mid-save" (a checkpoint being written) or
    "step-2" (at a random time after step 1's metrics are written)."""
    import random
    import signal
    import time

    args = ["train", "--quiet"] + (["--resume", str(out / name)] if resume else ["--model", str(model)])
    for s in [f"run.out_dir={out}", f"run.name={name}", *SMALL, "run.steps=3"]:
        args += ["--set", s]
    proc = subprocess.Popen([sys.executable, "-m", "r1mega.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=run_env(), start_new_session=True)
    run, deadline = out / name, time.monotonic() + 300
    rng = random.Random(moment)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ckpts = run / "checkpoints"
            if moment == "mid-save" and ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir()):
                break
            if moment == "step-2" and (run / "metrics.jsonl").is_file() and \
                    len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
                time.sleep(rng.uniform(0.0, 1.5))
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the kill ({moment}): {proc.stderr.read()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


def test_a_killed_run_resumes_bit_for_bit(tmp_path, small_base_model, uninterrupted_run):
    """SIGKILL mid-save, resume, SIGKILL again mid-step, resume: per-step metrics and the final
    export equal the uninterrupted run's (timings aside)."""
    whole = uninterrupted_run
    _run_until_killed(tmp_path, "killed", small_base_model, "mid-save")
    _run_until_killed(tmp_path, "killed", small_base_model, "step-2", resume=True)
    train(tmp_path, "killed", small_base_model, "run.steps=3", resume=True)
    resumed = tmp_path / "killed"
    assert [r["step"] for r in metrics(resumed)] == [0, 1, 2]
    assert deterministic(metrics(resumed)) == deterministic(metrics(whole))
    assert (resumed / "final/model.safetensors").read_bytes() == (whole / "final/model.safetensors").read_bytes()
    from safetensors.torch import load_file

    base, final = load_file(small_base_model / "model.safetensors"), load_file(whole / "final/model.safetensors")
    assert any(not torch.equal(base[k], final[k]) for k in final), "three steps changed no weight"


def test_a_reward_that_crashes_or_hangs_costs_its_sample_not_the_run(tmp_path, small_base_model):
    """rewards.custom kills its worker on some samples and hangs past rewards.timeout_s on others:
    the run finishes, those samples are left out (no reward, advantage 0), the rest train.
    With eval.greedy off the held-out greedy accuracy is a figure no problem has: it is null in
    eval.jsonl and in the checkpoints' data_state (NaN once stopped the run at its first save)."""
    train(tmp_path, "flaky", small_base_model, "rewards.custom=tests.rewards_custom:crash_or_hang",
          "rewards.custom_weight=0.5", "rewards.timeout_s=1.5", "run.samples_per_step=16", "eval.greedy=false")
    run = tmp_path / "flaky"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1]
    errors = sum(r["reward_errors"] for r in rows)
    scored = [r["reward_scored_frac"] for r in rows]
    assert errors > 0 and all(0.0 < f < 1.0 for f in scored), (errors, scored)
    for r in rows:
        assert all(r[k] == r[k] for k in ("loss", "grad_norm", "reward_mean", "reward_custom", "reward_accuracy")), r
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    left_out = [s for s in samples if s["reward"] is None]
    assert left_out and all(s["advantage"] == 0.0 for s in left_out), samples
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_accuracy_after"] == summary["heldout_accuracy_after"]  # not NaN
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(e["greedy_accuracy"] is None for e in evals), evals
    from r1mega.models import list_checkpoints

    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [1, 2]


def test_bad_input_is_one_line_before_any_work(tmp_path, small_base_model):
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"id": "a", "prompt": "What is 1 + 1?", "task": "math", "answer": "2"}\n'
                       '{"id": "b", "prompt": 3, "task": "math", "answer": "2"}\n')
    cases = [
        (["--model", str(tmp_path / "missing")], "run.model"),
        (["--model", str(small_base_model), "--data", str(bad_row)], "bad.jsonl"),
        (["--model", str(small_base_model), "--set", "grpo.group_size=0"], "grpo.group_size"),
        (["--model", str(small_base_model), "--set", "rollout.enginee=hf"], "did you mean"),
        (["--resume", str(tmp_path / "nothing")], "not a run directory"),
        (["--model", str(small_base_model), "--set", "rewards.custom=no_such_module:fn"], "rewards.custom"),
    ]
    for args, word in cases:
        proc = r1mega("train", "--quiet", "--set", f"run.out_dir={tmp_path}", *args, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], (args, proc.stderr[-2000:])
    assert not any(p.name == "r1mega" for p in tmp_path.iterdir())


def test_a_damaged_newest_checkpoint_resumes_from_the_previous(tmp_path, small_base_model, uninterrupted_run):
    """The newest checkpoint truncated on disk (a full disk, a lost node): the resumed run warns,
    naming it, restarts from the one before and ends equal to the uninterrupted run."""
    train(tmp_path, "damaged", small_base_model, "run.steps=2")
    run = tmp_path / "damaged"
    newest = run / "checkpoints" / "step_00000002"
    shard = max((newest / "weights").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train(tmp_path, "damaged", small_base_model, "run.steps=3", resume=True)
    assert "step_00000002 is damaged" in proc.stderr and "step_00000001" in proc.stderr, proc.stderr[-2000:]
    assert [r["step"] for r in metrics(run)] == [0, 1, 2]
    assert deterministic(metrics(run)) == deterministic(metrics(uninterrupted_run))
    assert (run / "final/model.safetensors").read_bytes() == (uninterrupted_run / "final/model.safetensors").read_bytes()


def test_grouped_experts_and_thd_train_like_the_default_layout(tmp_path, small_base_model, uninterrupted_run):
    """`r1mega train` with policy.grouped_gemm and policy.packed_format=thd: from the same rollouts
    (same engine, weights and seed) its first step equals the default layout's (per-expert
    modules, padded rows) to rounding, and it saves and exports. (Checkpoints across the two
    expert layouts: tests/test_models_grouped.py.)"""
    train(tmp_path, "grouped-thd", small_base_model, "run.steps=1", "policy.grouped_gemm=true",
          "policy.packed_format=thd")
    first, default = metrics(tmp_path / "grouped-thd")[0], metrics(uninterrupted_run)[0]
    assert first["reward_mean"] == default["reward_mean"]
    for key in ("loss", "grad_norm"):
        assert abs(first[key] - default[key]) <= 1e-5 * max(1.0, abs(default[key])), (key, first[key], default[key])
    assert (tmp_path / "grouped-thd/final/model.safetensors").exists()
    assert (tmp_path / "grouped-thd/checkpoints").is_dir()


def test_old_logprobs_from_the_rollout_skip_the_recompute_and_take_the_same_step(tmp_path, small_base_model,
                                                                                  uninterrupted_run):
    """grpo.old_logp=rollout: the hf engine's own log-probs (fp32, equal to the trainer's to ~1e-6)
    stand for the sampling policy's, so no log-prob pass runs for them; the first step equals the
    recomputing run's (whose TIS weight is 1 to rounding) and no mismatch metric is made up."""
    train(tmp_path, "rollout-logp", small_base_model, "run.steps=1", "grpo.old_logp=rollout", "grpo.tis=false",
          "grpo.tis_cap=none")
    first, default = metrics(tmp_path / "rollout-logp")[0], metrics(uninterrupted_run)[0]
    assert first["reward_mean"] == default["reward_mean"]
    for key in ("loss", "grad_norm"):
        assert abs(first[key] - default[key]) <= 1e-5 * max(1.0, abs(default[key])), (key, first[key], default[key])
    assert not any(key.startswith("mismatch_") for key in first) and "mismatch_abs_mean" in default
    assert first["approx_kl"] < 1e-9  # the engine's log-probs are the trainer's: the ratio starts at 1
    proc = r1mega("--set", "grpo.old_logp=rollout", "--dry-run")
    assert proc.returncode != 0 and "grpo.tis: True with grpo.old_logp=rollout weights nothing" in proc.stderr, \
        proc.stderr[-1000:]
