"""The one-script GPU check (launchers/gpu_check.sh runs this): every CUDA path of r1mega in one go.

    bash launchers/gpu_check.sh [--quick] [--only STEP[,STEP]] [--dry-run] [--out PATH]
    bash launchers/gpu_check.sh --fetch-wheels      # on a machine with a registry, beforehand

Steps, in order (each a command; each is timed, and a summary table follows):
    kernels   the compiled Triton kernels against float64 references at V = 32000 and 152064, bf16
              and fp32: log-probs and entropies, the GRPO loss forward and backward, the fused linear
              + loss op (tests/test_kernels_large_vocab.py), and the vocab-parallel op on two ranks
              sharing the GPU (tests/test_ops_vocab_parallel.py)
    gpu-tests every other `gpu`-marked test of the suite (pytest -m gpu; new GPU test files join it
              by their mark alone)
    models    a tiny DeepSeek-V3 and Qwen3-MoE (and Qwen2) on CUDA: HF import/export round trip,
              log-probs vs transformers' model on the GPU, GRPO steps vs transformers' autograd,
              checkpoints, the bucket stream; the weight stream into the hf rollout engine on the GPU
    bench     benchmarks/kernels/bench_grpo_loss.py: r1mega's kernels vs torch eager/compile and
              Liger-Kernel, installed first from build/wheels when that holds its wheel (this machine
              may reach no registry: --fetch-wheels puts the wheel there on one that does)

Needs a CUDA GPU: without one it says so in one line and exits 2 (--dry-run and --fetch-wheels run
anywhere). Exit status 1 if any step failed, else 0. One JSON line per step and one for the whole
run (the device, torch/triton/CUDA versions, git commit, date; _common.environment) are appended to
benchmarks/results/gpu_check.jsonl; each step's full output goes to build/gpu_check/<step>.log.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _common
from _common import REPO, RESULTS, append_jsonl, environment, print_table

# Liger-Kernel: a pure-Python wheel (Triton kernels, no compiled code). 0.8.5 declares
# torch>=2.1.2 and triton>=2.3.1, so it covers the GPU machine's torch 2.11 / triton 3.6; it is
# installed with --no-deps, never replacing that torch.
LIGER_PIN = "liger-kernel==0.8.5"
WHEELS = REPO / "build" / "wheels"
LOGS = REPO / "build" / "gpu_check"
DEFAULT_OUT = RESULTS / "gpu_check.jsonl"

KERNEL_TESTS = [
    "tests/test_kernels_large_vocab.py",
    "tests/test_ops_vocab_parallel.py::test_tensor_parallel_ranks_match_the_unsharded_ops",
]
MODEL_TESTS = [
    "tests/test_models_policy.py::test_reference_job_on_cuda",
    "tests/test_rollout_conformance.py::test_one_rank_layouts[cuda]",
]
BENCH = "benchmarks/kernels/bench_grpo_loss.py"
INSTALL_LIGER = ("install-liger-wheel",)  # a step's command run in this process (install_liger_wheel)
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]


@dataclass(frozen=True)
class Step:
    """One named part of the check: its commands, run in order until one fails, under one time limit."""

    name: str
    what: str
    commands: tuple[tuple[str, ...], ...]
    timeout_s: int


# Against torch eager and Liger-Kernel (torch.compile's providers would add minutes of compiling).
BENCH_PROVIDERS = ("r1mega-triton,liger-triton,torch-eager,"
                   "r1mega-linear-triton,liger-fused-linear,linear-torch-eager")


def steps(quick: bool) -> list[Step]:
    """The steps in order; --quick: the 32k vocabulary only, one benchmark case, no full gpu suite.

    The limits add up to 8 minutes: each is a cap on a step that hangs, not its expected time."""
    only_32k = ("-k", "not V152064") if quick else ()
    deselect = [a for t in KERNEL_TESTS + MODEL_TESTS for a in ("--deselect", t)]
    bench_sizes = (["--tokens", "4096", "--vocab", "32768"] if quick
                   else ["--tokens", "4096,16384", "--vocab", "32768,152064"])
    plan = [
        Step("kernels", "Triton kernels vs float64 at V=32000/152064, bf16+fp32; vocab-parallel on 2 ranks",
             ((*PYTEST, *only_32k, *KERNEL_TESTS),), 120),
        Step("gpu-tests", "every other gpu-marked test (pytest -m gpu)", ((*PYTEST, "tests", *deselect),), 120),
        Step("models", "tiny DeepSeek-V3/Qwen3-MoE on CUDA: round trip, log-probs, GRPO step, stream into hf engine",
             ((*PYTEST, *MODEL_TESTS),), 105),
        Step("bench", "bench_grpo_loss: r1mega vs torch eager vs Liger-Kernel",
             (INSTALL_LIGER,
              (sys.executable, BENCH, *bench_sizes, "--dtypes", "bf16", "--hidden", "4096",
               "--providers", BENCH_PROVIDERS, "--out", "benchmarks/results/bench_grpo_loss.jsonl")), 135),
    ]
    return [s for s in plan if not (quick and s.name == "gpu-tests")]


STEP_NAMES = ("kernels", "gpu-tests", "models", "bench")


def describe(command: tuple[str, ...]) -> str:
    """The command as a user would type it (the dry run, the logs, the results)."""
    if command == INSTALL_LIGER:
        return (f"pip install --no-deps --no-index --find-links build/wheels {LIGER_PIN}  "
                "(only if build/wheels holds it; else the Liger rows are skipped with a line)")
    shown = ["python" if c == sys.executable else c for c in command]
    return " ".join(shown)


def install_liger_wheel() -> tuple[int, str]:
    """Install the pinned Liger-Kernel from build/wheels; (0, why) when it is absent or already there."""
    try:
        import importlib.metadata as md

        installed = md.version("liger-kernel")
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or a broken installation
        installed = None
    if installed == LIGER_PIN.split("==")[1]:
        return 0, f"liger-kernel {installed} already installed"
    wheel = LIGER_PIN.split("==")[1]
    if not list(WHEELS.glob(f"liger_kernel-{wheel}-*.whl")):
        return 0, (f"no liger-kernel {wheel} wheel in {WHEELS.relative_to(REPO)}: the Liger rows will be skipped "
                   "(run `bash launchers/gpu_check.sh --fetch-wheels` on a machine with a registry and carry "
                   "build/wheels here)")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                           "--no-index", "--find-links", str(WHEELS), LIGER_PIN],
                          capture_output=True, text=True, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()[-2000:]


def fetch_wheels() -> int:
    """pip download the pinned Liger-Kernel wheel (no dependencies) into build/wheels."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", LIGER_PIN,
           "-d", str(WHEELS)]
    print("gpu_check: python " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, check=False).returncode


REQUIRED_MODULES = ("r1mega", "r1mega_kernels", "r1mega._batching", "megatron.core", "transformers", "pytest")


def missing_modules() -> list[str]:
    """The modules the steps import that this Python cannot find."""
    import importlib.util

    missing = []
    for name in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def device_environment() -> dict:
    """_common.environment() plus the GPU's name, CUDA and the CUDA build of torch."""
    import torch

    env = environment()
    env["cuda"] = torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    env["device_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return env


def pytest_counts(output: str) -> dict:
    """{'passed': n, 'failed': n, ...} from pytest's last summary line (empty if there is none)."""
    lines = [ln for ln in output.splitlines() if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)",
                                                    lines[-1])}


def run_command(command: tuple[str, ...], timeout_s: float, log) -> tuple[int, str]:
    """Run one command, echoing and logging its output as it comes; (exit status, output), 124 on a
    timeout (the command's whole process group is killed: pytest and its torchrun children)."""
    if command == INSTALL_LIGER:
        rc, text = install_liger_wheel()
        print(text, flush=True)
        log.write(text + "\n")
        return rc, text
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    chunks: list[str] = []

    def pump() -> None:  # pytest's progress dots come without newlines: copy whatever arrives
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            log.write(text)
            chunks.append(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    reader.join(timeout=10)
    if rc == 124:
        note = f"\ngpu_check: timed out after {timeout_s:.0f} s\n"
        print(note, end="")
        log.write(note)
        chunks.append(note)
    return rc, "".join(chunks)


def run_step(step: Step) -> dict:
    LOGS.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {step.name}: {step.what}", flush=True)
    started = time.monotonic()
    row: dict = {"step": step.name, "status": "ok", "commands": [describe(c) for c in step.commands]}
    output = ""
    with (LOGS / f"{step.name}.log").open("w") as log:
        for command in step.commands:
            print(f"$ {describe(command)}", flush=True)
            left = step.timeout_s - (time.monotonic() - started)
            rc, output = run_command(command, max(left, 1.0), log)
            if rc != 0:
                row.update(status="timed out" if rc == 124 else "failed", returncode=rc,
                           failed_command=describe(command))
                break
    row["seconds"] = round(time.monotonic() - started, 1)
    if step.name != "bench":
        row["tests"] = pytest_counts(output)
    row["log"] = str((LOGS / f"{step.name}.log").relative_to(REPO))
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="V=32000 kernels only, no full gpu-marked suite, one benchmark case")
    ap.add_argument("--only", help=f"comma-separated steps to run, of {','.join(STEP_NAMES)}")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    ap.add_argument("--fetch-wheels", action="store_true",
                    help=f"download {LIGER_PIN} (no dependencies) into build/wheels, then exit")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON lines file the results are appended to")
    args = ap.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(STEP_NAMES))
        if unknown:
            ap.error(f"--only: unknown step {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    plan = [s for s in steps(args.quick) if not args.only or s.name in args.only.split(",")]
    if args.dry_run:
        for i, step in enumerate(plan, 1):
            print(f"{i}. {step.name} (limit {step.timeout_s} s): {step.what}")
            for command in step.commands:
                print(f"     {describe(command)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: needs a CUDA GPU, and torch {torch.__version__} sees none here "
              "(--dry-run lists the steps; --fetch-wheels downloads the Liger-Kernel wheel)", file=sys.stderr)
        return 2
    missing = missing_modules()
    if missing:
        print(f"gpu_check: cannot import {', '.join(missing)} with {sys.executable}: set this machine up first "
              "(bash launchers/setup.sh, or PYTHON=<the python that has them>)", file=sys.stderr)
        return 1
    env = device_environment()
    print(f"gpu_check: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
          f"git {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}", flush=True)
    started = time.monotonic()
    rows = [run_step(step) for step in plan]
    total = round(time.monotonic() - started, 1)
    print("\n=== summary")
    print_table([("step", -11, lambda r: r["step"]), ("status", -11, lambda r: r["status"]),
                 ("seconds", 9, lambda r: f"{r['seconds']:.1f}"),
                 ("  tests", -40, lambda r: "  " + ", ".join(f"{n} {k}" for k, n in r.get("tests", {}).items()))],
                rows)
    failed = [r["step"] for r in rows if r["status"] != "ok"]
    print(f"total {total:.1f} s; " + (f"FAILED: {', '.join(failed)} (logs in build/gpu_check/)" if failed
                                      else "every step passed"))
    write_results(args.out, rows, env, quick=args.quick, seconds=total)
    return 1 if failed else 0


def write_results(path: str | Path, rows: list[dict], env: dict, *, quick: bool, seconds: float) -> None:
    """Append one JSON line per step and one for the run ("step": "all"), each with ``env``."""
    failed = [r["step"] for r in rows if r["status"] != "ok"]
    summary = {"step": "all", "status": "failed" if failed else "ok", "seconds": seconds, "quick": quick,
               "steps": [r["step"] for r in rows], "failed": failed}
    append_jsonl(path, [{"bench": "gpu_check", **r, **env} for r in rows + [summary]])


if __name__ == "__main__":
    raise SystemExit(main())
