"""Run untrusted Python programs in a sandbox: the core of the code-execution reward.

:func:`run_cases` runs a list of cases (a program and its stdin) in **one** sandbox, one after
the other, and returns one :class:`SandboxResult` per case; :func:`run_sandboxed` runs a single
program. :mod:`r1mega.rewards.code` runs all tests of a completion as the cases of one sandbox.
Every sandbox has its own namespaces, limits and scratch space, so concurrent ones (threads or
processes) neither see nor disturb each other, and no process of one is left when the call
returns.

What every program gets
-----------------------
* **A root file system built from nothing**: only /usr (with the /bin, /lib... links), the
  interpreter's own directories and /etc/ld.so.cache, ld.so.conf and localtime, read-only; a
  new /proc; a /dev of its own (null, zero, full, random, urandom); a private tmpfs /tmp
  (``max_disk_mb``) holding the working directory ``/tmp/work``, and an 8 MiB /dev/shm. No
  repository, no training data, no home directories, no /etc, /run, /sys: nothing the policy
  could read expected answers out of.
* **No network**: a new network namespace with only a loopback interface; a connection to the
  internet fails at once (ENETUNREACH), the host's loopback services are not reachable, a
  socket bound inside is not reachable from outside, raw sockets are denied.
* **Its own PID namespace**, whose PID 1 is our runner (:mod:`.launcher`): the program sees only
  its own processes and cannot signal, ptrace or read the memory of anything else. After each
  case every other process of the namespace is killed, so a daemonised grandchild cannot
  outlive its case, let alone the sandbox.
* **A seccomp filter** (:mod:`.seccomp`) denying what programs never need: ptrace, mount, the
  kernel keyring, bpf, perf, namespace creation, raw sockets, io_uring, modules, and more.
* **Limits**: per process, rlimits on CPU seconds (``ceil(timeout_s) + 1``, a backstop for the
  wall clock), address space (``memory_mb``), file size (``max_file_mb``), open files, no core
  dumps; per sample, where the machine allows (:mod:`.cgroups`), a cgroup bounding the memory
  of all its processes together (``memory_mb``, no swap) and their number (``max_procs``),
  else RLIMIT_NPROC on a per-run uid (:func:`limits_description` says which, for the log).
  NO_NEW_PRIVS: setuid binaries gain nothing.
* **A wall-clock timeout per case** (``timeout_s``); stdout and stderr are bounded
  (``max_output_mb`` each: past it the case is killed and ``output_truncated`` set).
* **An empty environment** (PATH, LANG, LC_ALL, HOME only) and the standard library only: the
  interpreter runs with ``-I -S`` (``site_packages=True`` allows site-packages), with the
  builtins the site module adds (``exit``, ``quit``, ``help``).

Each case runs in a process forked from the runner, an interpreter already started: a case
costs a fork rather than a sandbox and an interpreter start. Between cases the scratch space is
wiped and the program written afresh; each case has its own stdin, timeout and verdict.

Backends (:mod:`.backends`): "bwrap" (bubblewrap; a user namespace, uid 65534 inside) when it is
installed and works here, else "unshare" (root, no dependency; a per-run unprivileged uid
``SANDBOX_UID_BASE + pid``). Both need Linux >= 5.3 (pidfd); :func:`available_backends` tells
which work, :func:`require_backend` refuses in one line when none does. Neither is a defence
against kernel exploits: run untrusted code where that risk is acceptable.
"""

from __future__ import annotations

import marshal
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from r1mega.rewards.sandbox import backends, cgroups, seccomp
from r1mega.rewards.sandbox.backends import BACKENDS, DEFAULT_PYTHON
from r1mega.rewards.sandbox.launcher import PROGRAM_PATH, SANDBOX_UID_BASE, WORKDIR
from r1mega.rewards.sandbox.supervisor import SandboxProcess

__all__ = ["BACKENDS", "DEFAULT_PYTHON", "INSTALL_HINT", "PROGRAM_PATH", "SANDBOX_UID_BASE",
           "WORKDIR", "SandboxResult", "SandboxUnavailable", "available_backends",
           "limits_description", "require_backend", "run_cases", "run_sandboxed"]

INSTALL_HINT = ("install bubblewrap (e.g. `apt install bubblewrap`) or allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1)")
_SETUP_ALLOWANCE_S = 15.0  # sandbox start and tear-down, beyond the cases' own time limits


class SandboxUnavailable(RuntimeError):
    """No sandbox backend works on this machine (or the one asked for does not)."""


@dataclass(frozen=True)
class SandboxResult:
    """What one case did.

    returncode: the program's exit status; negative signal number when a signal ended it (as
        in subprocess), e.g. -9 after the wall-clock timeout; -1 when ``error`` is set. (A huge
        file gives Python programs OSError EFBIG, exit status 1: Python ignores SIGXFSZ.)
    stdout, stderr: decoded as UTF-8 (invalid bytes replaced), at most ``max_output_mb`` each.
    timed_out: the case's wall-clock timeout killed it.
    killed_by_signal: the signal that ended the program, or None when it exited.
    seconds: wall-clock time of the case (for :func:`run_sandboxed`, of the whole call).
    backend: "bwrap" or "unshare".
    output_truncated: the program wrote more than ``max_output_mb`` to a stream; it was killed.
    error: the sandbox itself failed (set-up error); the program may not have run.
    peak_memory_mb: the sample's peak memory over all its cases (with a cgroup), else None.
    oom_kills: processes of the sample the cgroup's memory limit killed (over all its cases).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    killed_by_signal: int | None
    seconds: float
    backend: str
    output_truncated: bool = False
    error: str | None = None
    peak_memory_mb: float | None = None
    oom_kills: int = 0

    @property
    def ok(self) -> bool:
        """Exited with status 0 on its own (no timeout, no signal, no truncation, no error)."""
        return (self.returncode == 0 and not self.timed_out and not self.output_truncated
                and self.error is None)


def _seccomp_filter() -> bytes:
    return seccomp.deny_filter() if seccomp.supported_machine() else b""


def limits_description() -> str:
    """One line for a run's log: how samples are bounded here (cgroup or rlimits, seccomp)."""
    filt = ("seccomp filter on" if seccomp.supported_machine()
            else f"no seccomp filter (no syscall table for {os.uname().machine})")
    return f"{cgroups.describe()}; {filt}"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr, flush=True)


def _run_backend(backend: str, cases: Sequence[tuple[str, str]], timeout_s: float, python: str,
                 limits: dict[str, int], memory_mb: int, max_procs: int, disk_mb: int,
                 max_output: int, site_packages: bool) -> list[SandboxResult]:
    t0 = time.monotonic()
    programs: list[str] = []
    index: dict[str, int] = {}
    job_cases = []
    for program, stdin in cases:
        if program not in index:
            index[program] = len(programs)
            programs.append(program)
        job_cases.append({"program": index[program], "stdin": stdin, "timeout_s": timeout_s})
    job = marshal.dumps({"programs": programs, "cases": job_cases, "limits": limits,
                         "max_output": max_output, "site_packages": site_packages,
                         "seccomp": _seccomp_filter()}, 4)
    cgroup = None
    if cgroups.support().version != "none":
        try:
            cgroup = cgroups.SampleCgroup(memory_mb << 20, max_procs)
        except OSError as err:  # e.g. the delegated cgroup went away: rlimits still bound the sample
            _warn_once(f"r1mega: code sandbox: running a sample without its cgroup ({err}); "
                       "rlimits still bound each process")
    try:
        deadline = _SETUP_ALLOWANCE_S + len(cases) * (timeout_s + 1.0)
        run = SandboxProcess(deadline, max_results=len(cases) * (12 * max_output + 4096))
        runner = backends.runner_argv(python, site_packages, run.job_r, run.results_w)
        procs = cgroup.procs_files if cgroup is not None else []
        if backend == "unshare":
            cfg = backends.unshare_config(python, runner, run.job_r, disk_mb, procs, site_packages)
            run.feed(cfg=marshal.dumps(cfg, 4), job=job)
            cmd = backends.launcher_command("--unshare", str(run.cfg_r), str(run.results_w))
        else:
            if backends.bwrap_features() is None:
                raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
            argv = backends.bwrap_argv(python, runner, run.info_w, run.status_w, disk_mb)
            cmd = backends.launcher_command("--exec-bwrap", marshal.dumps({
                "parent_pid": os.getpid(), "argv": argv, "cgroup_procs": procs,
                "expose": list(backends.interpreter_dirs(python))}, 4).hex())
            run.feed(job=job)
        run.start(cmd)
        run.run()
        peak = oom = None
        if cgroup is not None:
            peak_bytes = cgroup.peak_memory_bytes()
            peak = None if peak_bytes is None else peak_bytes / (1 << 20)
            oom = cgroup.oom_kills()
    finally:
        if cgroup is not None:
            cgroup.remove()
    return _results(backend, run, len(cases), time.monotonic() - t0, peak, oom or 0)


def _results(backend: str, run: SandboxProcess, n: int, seconds: float, peak: float | None,
             oom: int) -> list[SandboxResult]:
    by_case = {doc["case"]: doc for doc in run.lines if "case" in doc}
    setup_error = next((doc["error"] for doc in run.lines if "error" in doc), None)
    diagnostics = run.diagnostics.decode("utf-8", "replace")
    out = []
    for i in range(n):
        doc = by_case.get(i)
        if doc is None:
            why = setup_error or (
                "the sandbox exceeded its overall deadline" if run.timed_out else
                "the sandbox's output exceeded its bound" if run.overflowed else
                f"the sandbox ended before this case ran (exit status {run.proc.returncode})")
            tail = " ".join(diagnostics[-500:].split())
            out.append(SandboxResult(-1, "", "", False, None, seconds, backend,
                                     error=f"sandbox {backend}: {why}" + (f": {tail}" if tail else ""),
                                     peak_memory_mb=peak, oom_kills=oom))
            continue
        sig = doc.get("signal")
        code = doc.get("exit")
        if doc["timed_out"] or (doc["truncated"] and sig is None and code is None):
            sig, code = int(signal.SIGKILL), None
        returncode = -int(sig) if sig is not None else (code if code is not None else -1)
        out.append(SandboxResult(
            returncode=returncode, stdout=doc["stdout"].decode("utf-8", "replace"),
            stderr=doc["stderr"].decode("utf-8", "replace"),
            timed_out=doc["timed_out"], killed_by_signal=int(sig) if sig is not None else None,
            seconds=seconds if n == 1 else doc["seconds"], backend=backend,
            output_truncated=doc["truncated"], peak_memory_mb=peak, oom_kills=oom,
            error=None if (code is not None or sig is not None) else "the program left no status"))
    return out


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], str | None] = {}


def _probe(backend: str, python: str) -> str | None:
    """None when `backend` runs a trivial program here, else why not (cached per process)."""
    key = (backend, python)
    with _probe_lock:
        if key in _probed:
            return _probed[key]
        if backend == "bwrap" and backends.bwrap_features() is None:
            why: str | None = "bubblewrap (bwrap) is not installed"
        else:
            try:
                r = _run_backend(backend, [("print('ok')", "")], 30.0, python,
                                 backends.rlimits(30, 512, 32, 16, 64), 512, 32, 16, 1 << 20,
                                 False)[0]
                why = None if (r.ok and r.stdout == "ok\n") else (
                    r.error or f"probe failed: rc={r.returncode} {r.stderr[-500:]}")
            except (OSError, subprocess.SubprocessError) as e:
                why = f"probe failed: {e!r}"
        _probed[key] = why
        return why


def available_backends(python: str | None = None) -> tuple[str, ...]:
    """The backends that work on this machine, in order of preference."""
    python = python or DEFAULT_PYTHON
    return tuple(b for b in BACKENDS if _probe(b, python) is None)


_announced: set[str] = set()


def require_backend(python: str | None = None) -> str:
    """The backend code rewards will use here; SandboxUnavailable (one line: why each backend
    fails and what to install) when none works, so a run with code rewards refuses to start
    rather than losing every code sample. The first success in a process (on rank 0 of a
    distributed run) writes one line to stderr, the run's log: the backend and how samples are
    bounded (cgroup or rlimits only, and why; seccomp)."""
    python = python or DEFAULT_PYTHON
    reasons = {b: _probe(b, python) for b in BACKENDS}
    for b, why in reasons.items():
        if why is None:
            if b not in _announced and os.environ.get("RANK", "0") == "0":
                _announced.add(b)
                print(f"r1mega: code sandbox {b}; {limits_description()}", file=sys.stderr,
                      flush=True)
            return b
    details = "; ".join(f"{b}: {' '.join(str(why).split())[:200]}" for b, why in reasons.items())
    raise SandboxUnavailable(f"no code sandbox works on this machine ({details}); {INSTALL_HINT}")


def _check_args(timeout_s, sizes: dict, backend) -> None:
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _choose(backend: str | None, python: str) -> str:
    if backend is None:
        reasons = {}
        for b in BACKENDS:
            reasons[b] = _probe(b, python)
            if reasons[b] is None:
                return b
        raise SandboxUnavailable("no sandbox backend works here: " + "; ".join(
            f"{b}: {why}" for b, why in reasons.items()))
    why = _probe(backend, python)
    if why is not None:
        raise SandboxUnavailable(f"sandbox backend {backend!r} does not work here: {why}")
    return backend


def run_cases(cases: Sequence[tuple[str, str]], *, timeout_s: float, memory_mb: int,
              max_procs: int = 32, max_file_mb: int = 16, max_open_files: int = 64,
              backend: str | None = None, python: str | None = None,
              max_output_mb: int = 8, max_disk_mb: int = 64,
              site_packages: bool = False) -> list[SandboxResult]:
    """Run each ``(program, stdin)`` of `cases` in one sandbox, in order; one result per case.

    Each case runs ``program`` (Python source) as ``/tmp/work/main.py`` in ``/tmp/work``,
    reading ``stdin``, in a scratch space wiped before it. Limits: `timeout_s` wall clock per
    case (and ``ceil(timeout_s) + 1`` CPU seconds per process), `memory_mb` address space per
    process and, with a cgroup, for the whole sample; `max_procs` processes/threads of the
    sample at once; `max_file_mb` per file written, `max_open_files` descriptors,
    `max_output_mb` per output stream, `max_disk_mb` for everything written to /tmp.
    `backend`: "bwrap", "unshare" or None (the first of :func:`available_backends`); `python`:
    the interpreter (default :data:`DEFAULT_PYTHON`). Raises SandboxUnavailable when the chosen
    backend does not work here, ValueError on bad arguments.
    """
    if isinstance(cases, (str, bytes)) or not all(
            isinstance(c, tuple) and len(c) == 2 and all(isinstance(x, str) for x in c)
            for c in cases):
        raise ValueError("cases must be a list of (program, stdin) pairs of str")
    _check_args(timeout_s, {"memory_mb": memory_mb, "max_procs": max_procs,
                            "max_file_mb": max_file_mb, "max_open_files": max_open_files,
                            "max_output_mb": max_output_mb, "max_disk_mb": max_disk_mb}, backend)
    if not cases:
        return []
    python = python or DEFAULT_PYTHON
    backend = _choose(backend, python)
    limits = backends.rlimits(timeout_s, memory_mb, max_procs, max_file_mb, max_open_files)
    return _run_backend(backend, list(cases), float(timeout_s), python, limits, memory_mb,
                        max_procs, max_disk_mb, max_output_mb << 20, site_packages)


def run_sandboxed(program: str, *, stdin: str = "", timeout_s: float, memory_mb: int,
                  **kwargs) -> SandboxResult:
    """Run one program (see :func:`run_cases`, whose keyword arguments it takes); its
    ``seconds`` is the whole call's, sandbox set-up and tear-down included."""
    if not isinstance(program, str) or not isinstance(stdin, str):
        raise ValueError("program and stdin must be str")
    return run_cases([(program, stdin)], timeout_s=timeout_s, memory_mb=memory_mb, **kwargs)[0]
