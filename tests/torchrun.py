"""Run a worker script under ``torchrun`` on gloo and surface the workers' tracebacks.

Workers are plain scripts in ``tests/workers/``: they call ``torch.distributed.init_process_group
("gloo")``, assert what they check, and exit non-zero on failure. The launcher uses
``--standalone`` (rendezvous on a free local port), one OpenMP thread per worker (2 cores shared by
several processes), and a wall-clock timeout that kills the whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


class WorkerFailure(AssertionError):
    """A torchrun job failed or timed out; the message holds each rank's stderr tail."""


def _rank_logs(log_dir: Path, tail_chars: int = 4000) -> str:
    parts = []
    for path in sorted(log_dir.rglob("stderr.log")):
        text = path.read_text(errors="replace").strip()
        if text:
            parts.append(f"--- {path.relative_to(log_dir)} ---\n{text[-tail_chars:]}")
    return "\n".join(parts)


def run_torchrun(
    worker: str, nproc: int, *args: str, timeout_s: float = 240, env: dict[str, str] | None = None
) -> str:
    """Run ``tests/workers/<worker>`` on ``nproc`` gloo ranks; return rank 0's stdout.

    Raises WorkerFailure with every rank's stderr on a non-zero exit or a timeout.
    """
    script = WORKERS / worker
    if not script.is_file():
        raise FileNotFoundError(f"no worker script {script}")
    with tempfile.TemporaryDirectory(prefix="r1mega-torchrun-") as tmp:
        log_dir = Path(tmp)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--log-dir={log_dir}", "--redirects=3",
            str(script), *args,
        ]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1", **(env or {})}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=full_env, start_new_session=True,
        )
        try:
            launcher_out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise WorkerFailure(
                f"torchrun {worker} x{nproc} timed out after {timeout_s:.0f}s\n{_rank_logs(log_dir)}"
            ) from None
        if proc.returncode != 0:
            raise WorkerFailure(
                f"torchrun {worker} x{nproc} exited {proc.returncode}\n"
                f"{_rank_logs(log_dir)}\n--- launcher ---\n{launcher_out[-3000:]}"
            )
        rank0 = sorted(log_dir.rglob("0/stdout.log"))
        return rank0[0].read_text() if rank0 else ""
