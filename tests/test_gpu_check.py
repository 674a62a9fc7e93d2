"""launchers/gpu_check.sh (benchmarks/gpu_check.py) on a CPU: what can be checked without a GPU.

The dry run lists every step, the refusal without a GPU is one line and exit 2, every test file and
node the script names is collected by pytest (so the script cannot rot when tests move), a step's
command is timed, its failure and its timeout are reported, and the results writer produces JSON
lines with the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launchers" / "gpu_check.sh"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, check=False)


def test_dry_run_lists_every_step_with_its_commands():
    done = run_script("--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    numbered = [line.split(" ")[1] for line in lines if line[:1].isdigit()]
    assert numbered == list(gpu_check.STEP_NAMES) == ["kernels", "gpu-tests", "models", "bench"]
    for test in gpu_check.KERNEL_TESTS + gpu_check.MODEL_TESTS:
        assert test in done.stdout
    assert "pytest -q -p no:cacheprovider -m gpu tests --deselect" in done.stdout  # the whole gpu suite
    assert f"--find-links build/wheels {gpu_check.LIGER_PIN}" in done.stdout
    assert "benchmarks/kernels/bench_grpo_loss.py" in done.stdout
    assert sum(step.timeout_s for step in gpu_check.steps(quick=False)) <= 8 * 60  # the steps' caps: 8 minutes
    quick = run_script("--dry-run", "--quick", "--only", "kernels,gpu-tests,bench")
    assert quick.returncode == 0, quick.stderr
    assert [line.split(" ")[1] for line in quick.stdout.splitlines() if line[:1].isdigit()] == ["kernels", "bench"]
    assert "-k not V152064" in quick.stdout and "--tokens 4096 --vocab 32768" in quick.stdout


def test_unknown_step_is_refused_naming_it():
    done = run_script("--only", "kernels,warp-drive", "--dry-run")
    assert done.returncode == 2 and "--only: unknown step warp-drive" in done.stderr


def test_without_a_gpu_it_refuses_in_one_line_with_exit_2():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too
    done = run_script("--quick", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("gpu_check: needs a CUDA GPU"), done.stderr


def named_tests() -> list[str]:
    """Every test file or node id the script's steps name (as arguments or --deselect values)."""
    named = set()
    for quick in (False, True):
        for step in gpu_check.steps(quick):
            for command in step.commands:
                named.update(arg for arg in command if arg.startswith("tests/") and arg != "tests/")
    return sorted(named)


def test_every_named_test_exists_and_has_gpu_cases():
    named = named_tests()
    assert set(gpu_check.KERNEL_TESTS + gpu_check.MODEL_TESTS) <= set(named)
    assert (REPO / gpu_check.BENCH).is_file()
    # Collection only (nothing runs); -m gpu keeps the gpu-marked items, which a CPU still collects.
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu", *named], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    # exit 5: nothing ran, which conftest reports as "no tests collected"; a missing node exits 4
    assert done.returncode in (0, 5) and "ERROR" not in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    for node in named:
        assert any(item.startswith(node) for item in collected), f"{node}: no gpu-marked test collected"
    kernels = [item for item in collected if item.startswith("tests/test_kernels_large_vocab.py")]
    for size in ("V32000", "V152064"):
        assert sum(size in item for item in kernels) >= 3, kernels  # log-probs, loss, fused linear


def test_steps_are_timed_and_failures_and_timeouts_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)
    py = sys.executable
    ok = gpu_check.run_step(gpu_check.Step("ok", "passes", ((py, "-c", "print('1 passed, 2 skipped in 0.1s')"),), 60))
    assert ok["status"] == "ok" and ok["tests"] == {"passed": 1, "skipped": 2} and ok["seconds"] >= 0
    assert "1 passed" in (tmp_path / ok["log"]).read_text()
    failed = gpu_check.run_step(gpu_check.Step("bad", "fails", ((py, "-c", "raise SystemExit(3)"),
                                                                (py, "-c", "print('never')")), 60))
    assert failed["status"] == "failed" and failed["returncode"] == 3
    assert "never" not in (tmp_path / failed["log"]).read_text()  # a failed command ends its step
    hung = gpu_check.run_step(gpu_check.Step("hung", "hangs", ((py, "-c", "import time; time.sleep(60)"),), 1))
    assert hung["status"] == "timed out" and hung["returncode"] == 124 and hung["seconds"] < 30


def test_the_modules_the_steps_need_are_found_here(monkeypatch):
    assert gpu_check.missing_modules() == []  # this suite runs with all of them
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", ("r1mega", "no_such_module_r1mega", "nope.sub"))
    assert gpu_check.missing_modules() == ["no_such_module_r1mega", "nope.sub"]


def test_pytest_counts_reads_the_summary_line():
    out = "....F\n=== short test summary info ===\nFAILED x\n1 failed, 4 passed, 3 skipped, 2 deselected in 9.1s\n"
    assert gpu_check.pytest_counts(out) == {"failed": 1, "passed": 4, "skipped": 3, "deselected": 2}
    assert gpu_check.pytest_counts("no summary") == {}


def test_results_are_json_lines_with_the_environment(tmp_path):
    env = gpu_check.device_environment()
    rows = [{"step": "kernels", "status": "ok", "seconds": 1.5, "tests": {"passed": 3}},
            {"step": "bench", "status": "failed", "seconds": 2.0, "returncode": 1}]
    out = tmp_path / "results" / "gpu_check.jsonl"
    gpu_check.write_results(out, rows, env, quick=True, seconds=3.5)
    gpu_check.write_results(out, rows[:1], env, quick=False, seconds=1.5)  # appends
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["status"]) for r in lines] == [("kernels", "ok"), ("bench", "failed"), ("all", "failed"),
                                                          ("kernels", "ok"), ("all", "ok")]
    assert lines[2]["failed"] == ["bench"] and lines[2]["seconds"] == 3.5 and lines[2]["quick"] is True
    for row in lines:
        assert row["bench"] == "gpu_check"
        for key in ("device", "torch", "triton", "cuda", "git_commit", "date", "python"):
            assert key in row, key
        assert row["torch"] and row["date"]
        assert row["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
