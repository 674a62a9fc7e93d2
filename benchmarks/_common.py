"""Shared by the benchmark scripts: the environment every result row records, and JSONL output.

Scripts run as ``python benchmarks/<name>.py``, so this module imports as ``_common``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", else platform.processor(), else "unknown")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Date, interpreter, library versions, machine and git state of this run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **{name: _version(name) for name in ("torch", "triton")},
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def print_table(columns: list[tuple[str, int, object]], rows: list[dict]) -> None:
    """One line per row under a header: each column is (header, width, row -> text); a negative
    width aligns left."""
    print("".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w, _ in columns))
    for r in rows:
        print("".join(f"{fn(r):<{-w}}" if w < 0 else f"{fn(r):>{w}}" for _, w, fn in columns))


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append one JSON line per row (results accumulate across runs) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def run_torchrun(script: str | Path, world: int, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run a benchmark script's worker mode on `world` gloo ranks (one OpenMP thread each), with
    `env` added to the environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(script).resolve()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1",
           "PYTHONPATH": str(REPO / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
