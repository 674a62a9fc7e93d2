"""What only the real vLLM shows (the vLLM lane, launchers/vllm_lane.sh): a DeepSeek-V3 policy that
r1mega exports loads in vLLM as it is, with the router it was trained with, while the config
transformers wrote for the same model does not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

WORKERS = Path(__file__).resolve().parent / "workers"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def test_a_deepseek_v3_policy_exported_by_r1mega_loads_in_vllm_without_overrides(tmp_path, record_property):
    from tests.models_fixtures import VLLM_CONFIGS, make_tiny_hf

    source = make_tiny_hf("deepseek_v3", tmp_path / "source", config=VLLM_CONFIGS["deepseek_v3"])
    assert "topk_method" not in json.loads((source / "config.json").read_text())  # as transformers writes it
    megatron, exported = tmp_path / "megatron", tmp_path / "exported"
    for args in (("--hf", str(source), "--to-megatron", str(megatron)), ("--megatron", str(megatron), "--to-hf",
                                                                         str(exported))):
        done = _run("-m", "r1mega.cli", "convert", *args)
        assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((exported / "config.json").read_text())
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"

    loaded = _run(str(WORKERS / "vllm_load_export.py"), str(exported))
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    diff = float(re.search(r"^MAXDIFF (\S+)$", loaded.stdout, re.M)[1])
    print(f"exported DeepSeek-V3 in vLLM vs transformers: max log-prob difference {diff:.3g}")
    record_property("figures", f"r1mega's DeepSeek-V3 export in vLLM vs transformers: max log-prob difference {diff:.3g}")
    assert diff < 1e-4

    # the config transformers wrote: vLLM builds a softmax router without the correction bias and
    # cannot load the checkpoint (what the engine's overrides are for)
    raw = _run(str(WORKERS / "vllm_load_export.py"), str(source))
    assert raw.returncode != 0 and "e_score_correction_bias" in raw.stderr


def _train(out: Path, engine: str) -> list[dict]:
    done = _run("-m", "r1mega.cli", "train", "--quiet", "--set", f"rollout.engine={engine}", "--set", "run.steps=3",
                "--set", "eval.max_prompts=64", "--set", f"run.out_dir={out}", "--set", f"run.name={engine}",
                timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / engine / "metrics.jsonl").read_text().splitlines()]


def test_the_main_job_trains_on_vllm_with_the_engine_agreeing_with_the_trainer_every_step(tmp_path, record_property):
    """`r1mega train --set rollout.engine=vllm` on the embedded default (head dim 32), on CPU: the
    rollout-vs-trainer mismatch stays under 1e-4 every step (float32), every refit passes
    rollout.verify_refit's probe, and held-out pass@1 is in line with the hf engine's run."""
    runs = {engine: _train(tmp_path, engine) for engine in ("vllm", "hf")}
    for row in runs["vllm"]:
        assert row["mismatch_abs_max"] < 1e-4, row
    summaries = {e: json.loads((tmp_path / e / "summary.json").read_text()) for e in runs}
    figures = {e: (s["heldout_accuracy_before"], s["heldout_accuracy_after"]) for e, s in summaries.items()}
    print(f"held-out pass@1 before -> after 3 steps: {figures}")
    worst = max(row["mismatch_abs_max"] for row in runs["vllm"])
    record_property("figures", "held-out pass@1 before -> after 3 steps: " + ", ".join(
        f"{e} {a:.3f} -> {b:.3f}" for e, (a, b) in figures.items()) + f"; vllm mismatch_abs_max at most {worst:.3g}")
    for i in (0, 1):
        assert figures["vllm"][i] == pytest.approx(figures["hf"][i], abs=0.1), figures
