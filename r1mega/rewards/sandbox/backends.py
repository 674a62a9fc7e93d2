"""The two sandbox backends: the command each runs, and whether each works on this machine.

Both start the runner of :mod:`.launcher` as PID 1 of fresh namespaces with a root file system
built from nothing; they differ in who builds it. "unshare" (root, no dependency): our launcher
unshares the namespaces and builds the root itself (:func:`.launcher.build_root`). "bwrap"
(bubblewrap, as root or where unprivileged user namespaces are allowed): bubblewrap adds a user
namespace (uid 65534 inside, no capabilities, nested user namespaces disabled where it supports
``--disable-userns``) and builds the same root from our bind list.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys

from r1mega.rewards.sandbox import launcher

BACKENDS = ("bwrap", "unshare")
# The base interpreter this process runs on (a virtual environment's is made from it): programs
# run on it with -I, so a venv adds nothing to them, and one under /tmp would not even exist
# inside the sandbox's private /tmp.
HOST_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
DEFAULT_PYTHON = os.environ.get("R1MEGA_SANDBOX_PYTHON") or HOST_PYTHON
LAUNCHER_PATH = os.path.abspath(launcher.__file__)


@functools.lru_cache(maxsize=1)
def launcher_source() -> str:
    """The launcher's source, run inside the sandbox with ``-c`` (the repository is not there)."""
    with open(LAUNCHER_PATH, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=8)
def interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories `python` needs (its bin dir and prefixes), real paths, outermost only."""
    if os.path.realpath(python) == HOST_PYTHON:
        prefixes = [sys.base_prefix, sys.base_exec_prefix]
    else:
        code = ("import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, "
                "sys.exec_prefix, sys.base_exec_prefix]))")
        out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True,
                             timeout=30, check=True, env=launcher.SANDBOX_ENV)
        prefixes = json.loads(out.stdout)
    dirs = {os.path.realpath(d) for d in prefixes}
    dirs.add(os.path.dirname(os.path.abspath(python)))
    dirs.add(os.path.dirname(os.path.realpath(python)))
    dirs = sorted(d for d in dirs if d != "/")
    return tuple(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def rlimits(timeout_s: float, memory_mb: int, max_procs: int, max_file_mb: int,
            max_open_files: int) -> dict[str, int]:
    """Per-process limits of a program (CPU seconds a backstop for the wall clock)."""
    return {
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_NPROC": max_procs,
        "RLIMIT_FSIZE": max_file_mb << 20,
        "RLIMIT_NOFILE": max_open_files,
        "RLIMIT_CORE": 0,
    }


@functools.lru_cache(maxsize=1)
def _compiled_launcher() -> str:
    import base64
    import marshal

    code = compile(launcher_source(), "<r1mega sandbox runner>", "exec")
    return base64.b64encode(marshal.dumps(code)).decode()


_EXEC_COMPILED = ("import binascii, marshal, sys; "
                  "exec(marshal.loads(binascii.a2b_base64(sys.argv.pop(1))))")


def runner_argv(python: str, site_packages: bool, job_fd: int, results_fd: int) -> list[str]:
    """The runner's command line inside the sandbox (the uid is appended by the backend): the
    launcher's code, compiled here when the sandbox's interpreter is this one (marshal is
    version-specific), else its source."""
    flags = ["-I"] if site_packages else ["-I", "-S"]
    if os.path.realpath(python) == HOST_PYTHON:
        code = ["-c", _EXEC_COMPILED, _compiled_launcher()]
    else:
        code = ["-c", launcher_source()]
    return [python, *flags, *code, "--runner", str(job_fd), str(results_fd)]


@functools.lru_cache(maxsize=1)
def bwrap_features() -> tuple[str, frozenset[str]] | None:
    """bubblewrap's path and the options its version knows, or None when it is not installed."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    try:
        help_text = subprocess.run([exe, "--help"], capture_output=True, text=True,
                                   timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return exe, frozenset(w for w in help_text.split() if w.startswith("--"))


def bwrap_argv(python: str, runner: list[str], info_fd: int, status_fd: int,
               disk_mb: int) -> list[str]:
    """bubblewrap's command: the same root as :func:`.launcher.build_root`, the runner as PID 1."""
    exe, flags = bwrap_features()  # type: ignore[misc]
    cmd = [exe, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
           "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1",
           "--clearenv"]
    if "--disable-userns" in flags:
        cmd.append("--disable-userns")
    for k, v in launcher.SANDBOX_ENV.items():
        cmd += ["--setenv", k, v]
    for top in launcher.ROOT_DIRS:
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for f in launcher.ROOT_FILES:
        cmd += ["--ro-bind-try", f, f]
    for d in interpreter_dirs(python):
        if not any(d == t or d.startswith(t + "/") for t in launcher.ROOT_DIRS):
            cmd += ["--ro-bind", d, d]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    sized = "--size" in flags
    cmd += (["--perms", "1777"] if "--perms" in flags else []) + (
        ["--size", str(disk_mb << 20)] if sized else []) + ["--tmpfs", "/tmp"]
    cmd += (["--size", str(8 << 20)] if sized else []) + ["--tmpfs", "/dev/shm"]
    cmd += ["--chdir", "/tmp"]
    cmd += ["--remount-ro", "/"]  # bwrap's own root tmpfs (holding the mount points) read-only
    cmd += ["--info-fd", str(info_fd), "--json-status-fd", str(status_fd)]
    return cmd + ["--", *runner, "-1"]


def unshare_config(python: str, runner: list[str], job_fd: int, disk_mb: int,
                   cgroup_procs: list[str], site_packages: bool) -> dict:
    """The unshare launcher's configuration (read from its CFG_FD). When the programs' interpreter
    is the launcher's own, started the same way (``-I -S``), the namespace's init becomes the
    runner without exec'ing another interpreter (``"runner": None``)."""
    same = os.path.realpath(python) == HOST_PYTHON and not site_packages
    return {"parent_pid": os.getpid(), "runner": None if same else runner, "job_fd": job_fd,
            "env": launcher.SANDBOX_ENV,
            "disk_mb": disk_mb, "binds": list(interpreter_dirs(python)),
            "mount_point": "/tmp", "cgroup_procs": cgroup_procs}


# Imported rather than run as a script, so that its compiled form is cached in __pycache__; its
# directory goes last on the path, so that no file there can stand in for a standard module.
_LAUNCH = ("import sys; sys.path.append(sys.argv.pop(1)); import launcher; "
           "launcher.exit_with(launcher.main(sys.argv[1:]))")


def launcher_command(mode: str, *args: str) -> list[str]:
    """The launcher's command line on the host (root, or bwrap's caller)."""
    return [HOST_PYTHON, "-I", "-S", "-c", _LAUNCH, os.path.dirname(LAUNCHER_PATH), mode, *args]
