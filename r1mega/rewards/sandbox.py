"""Run an untrusted Python program in a sandbox: the core of the code-execution reward.

:func:`run_sandboxed` runs one program (with an optional stdin) and returns a
:class:`SandboxResult`; :mod:`r1mega.rewards.code` builds the reward on it. Every run gets its
own namespaces, limits and scratch space, so concurrent runs (threads or processes) neither see
nor disturb each other, and no process of a run is left when the call returns.

What both backends give the program
-----------------------------------
* **No network**: a new network namespace with nothing but a loopback interface (down under
  "unshare", up but empty under "bwrap"): a connection to the internet fails at once
  (ENETUNREACH), one to a service on the host's loopback is refused or unreachable, abstract
  Unix sockets of the host are not visible.
* **Its own PID namespace** (and session): it sees only its own processes and cannot signal or
  ptrace anything outside (the trainer, other samples, the host's pid 1). When its main process
  ends, or the wall-clock timeout kills the namespace's init, the kernel kills every process
  left in it: a daemonised child (double fork + setsid) cannot outlive the run.
  :func:`run_sandboxed` returns only once the namespace is empty.
* **rlimits**, per process: CPU seconds (``ceil(timeout_s) + 1``, a backstop for the wall
  clock), address space (``memory_mb``), file size (``max_file_mb``: EFBIG / SIGXFSZ), open
  files (``max_open_files``), no core dumps; and processes (``max_procs``, threads included),
  counted for this sample only (see the backends). NO_NEW_PRIVS: setuid binaries gain nothing.
* **A wall-clock timeout**: at ``timeout_s`` the namespace is killed (SIGKILL to its init) and
  ``timed_out`` is set. stdout/stderr are read by a bounded reader: past ``max_output_mb`` per
  stream the run is killed and ``output_truncated`` is set.
* **An empty environment**: PATH, LANG, LC_ALL and HOME only; none of the caller's variables
  (API keys, tokens), and /proc is the sandbox's own, so no ``/proc/<pid>/environ`` of the
  caller is reachable. The interpreter runs with ``-I -S``: isolated mode (PYTHON* variables
  and the user site ignored) without site-packages, so the program gets the standard library
  only and cannot import the trainer's packages (``site_packages=True`` allows them); the
  builtins the site module adds (``exit``, ``quit``, ``help``) are still defined.
* **Private, size-limited scratch space**: the working directory ``/tmp/work`` is in a fresh
  tmpfs on /tmp (``max_disk_mb`` in all; /dev/shm gets an 8 MiB one), which disappears with the
  run. Writing anywhere else fails: read-only, or not there.
* Private IPC (SysV, POSIX message queues) and UTS (hostname "sandbox") namespaces.

``backend=None`` picks "bwrap" when bubblewrap is installed and works here, else "unshare";
:func:`available_backends` tells which work. Both need Linux >= 5.3 (pidfd).

"unshare": no dependency, needs root (CAP_SYS_ADMIN, CAP_SETUID)
-----------------------------------------------------------------
This module, run as a launcher (``python -I -S sandbox.py``), calls unshare(2) for new mount,
network, PID, IPC and UTS namespaces and forks the namespace's init. In its private mount
namespace the init makes the whole file tree read-only (recursively), mounts a new /proc, the
tmpfs scratch space, and empty read-only tmpfs over /root, /home, /run (the host's Unix
sockets: a network namespace does not cover sockets in the file system), /mnt, /media and
/srv; the interpreter's prefix stays reachable at its path when it lives there (pyenv under
/root) or under a directory others cannot enter. It then forks the program as a **per-run
unprivileged uid** (``1_900_000_000 + the launcher's pid``, unique among running samples) with
no groups. That uid makes RLIMIT_NPROC count this sample's processes only (the kernel never
applies the limit to uid 0, and a uid shared by samples would let one fork bomb starve the
others), and makes file permissions apply: root-only files (/etc/shadow) are unreadable.
*Protects*: all of the above. *Does not protect*: the program can **read** every
world-readable file outside the emptied directories (system files, a world-readable source
tree such as the repository, /sys); it may create nested user namespaces (kernel attack
surface; no way out of the limits); memory is bounded per process only, so one sample can hold
up to ``max_procs x memory_mb`` of address space (no cgroup); no seccomp filter.

"bwrap": bubblewrap, when installed (as root, or as any user where unprivileged user
namespaces are allowed)
---------------------------------------------------------------------------------------------
bubblewrap adds a user namespace (uid 65534 inside, no capabilities; nested user namespaces
are disabled with ``--disable-userns`` on bubblewrap >= 0.8) and builds the root file system
from nothing: only /usr (with the /bin, /lib, /lib64, /sbin links), the interpreter's prefix
and /etc/ld.so.cache, ld.so.conf and localtime are bound, read-only; /proc, a minimal /dev and
the tmpfs scratch space are new, and bwrap's own root is remounted read-only. The sandbox's
PID 1 is a small init of ours (``--as-pid-1``) that sets the rlimits on the program it forks,
reaps orphans and exits with the program's status. A launcher execs bwrap so that it dies
with the caller; when the caller is root it first switches to a per-run unprivileged uid as
above (bwrap run by root keeps uid 0 outside its user namespace, where RLIMIT_NPROC never
applies) after exposing the interpreter's prefix in a private mount namespace if it is under a
directory others cannot enter. RLIMIT_NPROC then counts the sandbox's own user namespace.
*Protects*: all of the above, and hides the host's files (home directories, /etc, /run, the
repository, /sys). *Does not protect*: memory is per process as above; no seccomp filter; a
bubblewrap without ``--size`` or ``--disable-userns`` (both in 0.8, Debian 12's) leaves the
tmpfs sizes unlimited (files are still bounded by RLIMIT_FSIZE) and nested user namespaces
allowed. An exit status of 129..192 is reported as a signal (the init passes a signal on as
128 + signal).

The interpreter is :data:`DEFAULT_PYTHON` (the trainer's own, or ``R1MEGA_SANDBOX_PYTHON``),
or ``python=`` per call.

Neither backend is a defence against kernel exploits: run untrusted code on machines where
that risk is acceptable.
"""

from __future__ import annotations

import os
import resource  # imported before the launcher's mounts can hide the interpreter's lib-dynload
import sys

# ------------------------------------------------------------------------------------------------
# Launcher side. `python -I -S sandbox.py CONTROL_FD STATUS_FD` runs only this part (stdlib, no
# r1mega imports), as root: the configuration is read from CONTROL_FD, status lines (JSON) are
# written to STATUS_FD.
# ------------------------------------------------------------------------------------------------

_UID_BASE = 1_900_000_000  # above systemd's container range (524288..1879048191), below 2**31
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SYS_MOUNT_SETATTR = 442  # the same on every architecture but alpha (new syscalls since 5.1)
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD = 0x1, 0x2, 0x8000, -100

WORKDIR = "/tmp/work"
PROGRAM_PATH = WORKDIR + "/main.py"
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": WORKDIR,
}


def _apply_rlimits(limits: dict) -> None:
    """Set the program's rlimits (soft = hard, except CPU where hard = soft + 1 for SIGKILL)."""
    for name, value in limits.items():
        which = getattr(resource, name)
        hard = value + 1 if name == "RLIMIT_CPU" else value
        resource.setrlimit(which, (value, hard))


# The bwrap backend's init (PID 1 of the sandbox, bwrap --as-pid-1; argv: limits-json, exe,
# args...): forks the program with its rlimits, reaps orphans, exits with the program's status
# (128 + signal when a signal ended it). Unlike bwrap's own init, it lets bwrap reap it.
_BWRAP_INIT = (
    "import json,os,resource,signal,sys\n"
    "os.closerange(3,1<<20)\n"
    "signal.signal(signal.SIGINT,signal.SIG_IGN)\n"
    "pid=os.fork()\n"
    "if pid==0:\n"
    "    signal.signal(signal.SIGINT,signal.SIG_DFL)\n"
    "    os.setsid()\n"
    "    for n,v in json.loads(sys.argv[1]).items():\n"
    "        resource.setrlimit(getattr(resource,n),(v,v+1 if n=='RLIMIT_CPU' else v))\n"
    "    os.execv(sys.argv[2],sys.argv[2:])\n"
    "while True:\n"
    "    p,st=os.waitpid(-1,0)\n"
    "    if p==pid:\n"
    "        os._exit(128+os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))\n"
)


class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def prctl(self, option: int, arg: int) -> None:
        c = self.ctypes
        self._check(self.lib.prctl(c.c_int(option), c.c_ulong(arg), c.c_ulong(0), c.c_ulong(0),
                                   c.c_ulong(0)), f"prctl({option})")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(self.ctypes.c_int(flags)), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        enc = (lambda s: None if s is None else s.encode())
        self._check(self.lib.mount(enc(source), enc(target), enc(fstype),
                                   self.ctypes.c_ulong(flags), enc(data)),
                    f"mount {source} on {target}")

    def sethostname(self, name: str) -> None:
        b = name.encode()
        self._check(self.lib.sethostname(b, self.ctypes.c_size_t(len(b))), "sethostname")

    def make_tree_readonly(self) -> None:
        """Every mount of this (private) mount namespace read-only and nosuid."""
        c = self.ctypes
        if os.uname().machine != "alpha":
            attr = (c.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
            rc = self.lib.syscall(c.c_long(_SYS_MOUNT_SETATTR), c.c_int(_AT_FDCWD), b"/",
                                  c.c_uint(_AT_RECURSIVE), c.byref(attr), c.c_size_t(32))
            if rc == 0:
                return
        # Kernels before 5.12: remount every mount point read-only, one by one.
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in points:
            point = point.replace("\\040", " ")
            try:
                opts = os.statvfs(point).f_flag
            except OSError:
                continue
            keep = opts & (_MS_NODEV | _MS_NOEXEC)
            self.mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | keep)


def _hidden_ancestor(path: str) -> str | None:
    """The topmost ancestor directory of `path` that others cannot enter, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _expose(libc: _Libc, paths: list[str], hide: tuple[str, ...] = ()) -> None:
    """Replace directories by empty read-only tmpfs, keeping `paths` reachable inside them.

    The directories replaced are those in `hide` and any ancestor of a path in `paths` that
    others cannot enter (pyenv under /root, mode 0700). Each path in `paths` under a replaced
    directory is recreated in the tmpfs and the real directory bind-mounted there. Needs a
    writable /tmp (a private tmpfs) for the bind mounts in transit.
    """
    tops = {h for h in hide if os.path.isdir(h) and not os.path.islink(h)}
    tops |= {a for a in map(_hidden_ancestor, paths) if a is not None}
    tops = {t for t in tops if not any(t.startswith(o + "/") for o in tops)}  # outermost only
    for n, top in enumerate(sorted(tops)):
        if top in paths:
            continue  # the interpreter is this directory itself: keep it
        inner = [p for p in paths if p.startswith(top + "/")]
        holds = []
        for i, p in enumerate(inner):
            hold = f"/tmp/.hold{n}-{i}"
            os.mkdir(hold, 0o700)
            libc.mount(p, hold, None, _MS_BIND | _MS_REC)
            holds.append((hold, p))
        libc.mount("tmpfs", top, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
        for hold, p in holds:
            os.makedirs(p, 0o755, exist_ok=True)
            libc.mount(hold, p, None, _MS_MOVE)
            os.rmdir(hold)
        libc.mount(None, top, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


# Directories the unshare backend empties (beyond /tmp and /dev/shm, which get private tmpfs):
# home directories, and /run with the host's Unix sockets (a network namespace does not cover
# sockets in the file system: D-Bus, databases, ...).
_HIDDEN_DIRS = ("/root", "/home", "/run", "/mnt", "/media", "/srv")


def _init_main(cfg: dict, uid: int, libc: _Libc, report) -> int:
    """PID 1 of the sandbox's namespaces (root): build the file system, run and reap the program."""
    libc.prctl(_PR_SET_PDEATHSIG, 9)
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    libc.make_tree_readonly()
    libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    libc.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={cfg['disk_mb']}m,mode=1777")
    if os.path.isdir("/dev/shm"):
        libc.mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=8m,mode=1777")
    _expose(libc, cfg["expose"], _HIDDEN_DIRS)
    libc.sethostname("sandbox")
    os.mkdir(WORKDIR, 0o700)
    with open(PROGRAM_PATH, "w", encoding="utf-8") as f:
        f.write(cfg["program"])
    os.chown(WORKDIR, uid, uid)
    os.chown(PROGRAM_PATH, uid, uid)

    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            os.chdir(WORKDIR)
            os.closerange(3, 1 << 20)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc.prctl(_PR_SET_PDEATHSIG, 9)  # PID 1 dies -> program dies (setuid cleared it)
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
            _apply_rlimits(cfg["limits"])
            os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
        except BaseException as e:  # noqa: BLE001 - report whatever stopped the exec
            os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
        os._exit(127)
    while True:  # PID 1 reaps orphans until the program itself ends
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    if os.WIFSIGNALED(status):
        report(signal=os.WTERMSIG(status))
    else:
        report(exit=os.WEXITSTATUS(status))
    return 0  # returning ends PID 1: the kernel kills whatever the program left behind


def _drop_privileges(libc: _Libc, uid: int, parent_pid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(_PR_SET_PDEATHSIG, 9)  # a change of uid cleared it
    if os.getppid() != parent_pid:
        os._exit(1)


def _exec_bwrap(libc: _Libc, cfg: dict) -> int:
    """The bwrap backend's launcher: exec bubblewrap so that it dies with the caller, and as root,
    first become a per-run unprivileged uid.

    bwrap run by root keeps uid 0 outside its user namespace, and the kernel never applies
    RLIMIT_NPROC to uid 0; run by an unprivileged uid, the limit counts the sandbox's own user
    namespace. When the interpreter is under a directory closed to others, it is exposed first
    in a private mount namespace (see _expose), which bwrap then inherits. The parent-death
    signal (kept across exec) kills bwrap, and so the sandbox (--die-with-parent), when the
    caller dies.
    """
    if os.geteuid() == 0:
        if any(_hidden_ancestor(p) for p in cfg["expose"]):
            libc.unshare(_CLONE_NEWNS)
            libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
            libc.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0700")
            _expose(libc, cfg["expose"])
        _drop_privileges(libc, _UID_BASE + os.getpid(), cfg["parent_pid"])
    os.execv(cfg["argv"][0], cfg["argv"])
    return 127


def _launcher_main() -> int:
    import json

    libc = _Libc()
    libc.prctl(_PR_SET_PDEATHSIG, 9)  # the caller dies -> the launcher dies -> PID 1 dies
    if sys.argv[1] == "--exec-bwrap":
        cfg = json.loads(sys.argv[2])
        if os.getppid() != cfg["parent_pid"]:
            return 1
        try:
            return _exec_bwrap(libc, cfg)
        except OSError as e:
            os.write(2, f"sandbox: cannot start bwrap: {e}\n".encode())
            return 126
    control_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while True:
        b = os.read(control_fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(control_fd)
    cfg = json.loads(b"".join(chunks))
    if os.getppid() != cfg["parent_pid"]:
        return 1  # the caller is already gone

    def report(**kw) -> None:
        os.write(status_fd, (json.dumps(kw) + "\n").encode())

    try:
        libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS)
    except OSError as e:
        report(error=f"{e} (the unshare backend needs root)")
        return 0
    uid = _UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            code = _init_main(cfg, uid, libc, report)
        except BaseException as e:  # noqa: BLE001
            report(error=f"sandbox setup failed: {e!r}")
            code = 1
        os._exit(code)
    report(init_pid=pid, uid=uid)
    os.waitpid(pid, 0)  # returns once PID 1 and, with it, every process of the namespace is gone
    return 0


if __name__ == "__main__":
    sys.exit(_launcher_main())

# ------------------------------------------------------------------------------------------------
# Caller side.
# ------------------------------------------------------------------------------------------------

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

BACKENDS = ("bwrap", "unshare")
# The base interpreter the trainer's runs on (a virtual environment's is made from it): the
# launcher and, by default, the programs run on it with -I -S, so a venv adds nothing to them.
_HOST_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
DEFAULT_PYTHON = os.environ.get("R1MEGA_SANDBOX_PYTHON") or _HOST_PYTHON
"""The interpreter programs run with: the one the trainer's runs on, unless
``R1MEGA_SANDBOX_PYTHON`` names another. A virtual environment's interpreter is replaced by the
base interpreter it was made from: programs run without site-packages, so the environment adds
nothing, and one under /tmp would not even exist inside the sandbox's private /tmp. It may live
where others cannot read (pyenv under /root): both backends make its prefix, and only that,
reachable inside the sandbox."""

# `python -I -S -c _NO_SITE_BOOT main.py`: runs main.py as __main__ without site-packages
# (3x faster start than with site, which also runs every .pth file) yet with the builtins the
# site module adds (exit, quit, help, ...): competitive programs often end with exit().
_NO_SITE_BOOT = """\
def _boot():
    import site, sys
    site.setquit(); site.setcopyright(); site.sethelper()
    path = sys.argv.pop(1)
    sys.argv[0] = path
    g = sys.modules["__main__"].__dict__
    g["__file__"] = path
    del g["_boot"]
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    exec(code, g)
_boot()
"""
_LAUNCHER_PATH = os.path.abspath(__file__)
_KILL_GRACE_S = 5.0


class SandboxUnavailable(RuntimeError):
    """No sandbox backend works on this machine (or the one asked for does not)."""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    returncode: the program's exit status; negative signal number when a signal ended it (as
        in subprocess), e.g. -9 after the wall-clock timeout; -1 when ``error`` is set. (A huge
        file gives Python programs OSError EFBIG, exit status 1: Python ignores SIGXFSZ.)
    stdout, stderr: decoded as UTF-8 (invalid bytes replaced), at most ``max_output_mb`` each.
    timed_out: the wall-clock timeout killed the run.
    killed_by_signal: the signal that ended the program, or None when it exited.
    seconds: wall-clock time of the whole call (sandbox set-up and tear-down included).
    backend: "bwrap" or "unshare".
    output_truncated: the program wrote more than ``max_output_mb`` to a stream; it was killed.
    error: the sandbox itself failed (set-up error); the program may not have run.
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

    @property
    def ok(self) -> bool:
        """Exited with status 0 on its own (no timeout, no signal, no truncation, no error)."""
        return (self.returncode == 0 and not self.timed_out and not self.output_truncated
                and self.error is None)


@functools.lru_cache(maxsize=8)
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories `python` needs (its bin dir and prefixes), real paths, outermost only."""
    if os.path.realpath(python) == _HOST_PYTHON:
        prefixes = [sys.base_prefix, sys.base_exec_prefix]
    else:
        code = ("import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, "
                "sys.exec_prefix, sys.base_exec_prefix]))")
        out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True,
                             timeout=30, check=True, env=SANDBOX_ENV)
        prefixes = json.loads(out.stdout)
    dirs = {os.path.realpath(d) for d in prefixes}
    dirs.add(os.path.dirname(os.path.abspath(python)))
    dirs.add(os.path.dirname(os.path.realpath(python)))
    dirs = sorted(d for d in dirs if d != "/")
    return tuple(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def _limits(timeout_s: float, memory_mb: int, max_procs: int, max_file_mb: int,
            max_open_files: int) -> dict[str, int]:
    return {
        "RLIMIT_CPU": max(1, math.ceil(timeout_s)) + 1,
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_NPROC": max_procs,
        "RLIMIT_FSIZE": max_file_mb << 20,
        "RLIMIT_NOFILE": max_open_files,
        "RLIMIT_CORE": 0,
    }


# ------------------------------------------------------------------ bubblewrap
@functools.lru_cache(maxsize=1)
def _bwrap_features() -> tuple[str, frozenset[str]] | None:
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    try:
        help_text = subprocess.run([exe, "--help"], capture_output=True, text=True,
                                   timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    flags = frozenset(w for w in help_text.split() if w.startswith("--"))
    return exe, flags


def _bwrap_argv(python: str, program_fd: int, info_fd: int, status_fd: int, argv: list[str],
                limits: dict[str, int], disk_mb: int) -> list[str]:
    exe, flags = _bwrap_features()  # type: ignore[misc]
    cmd = [exe, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
           "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1",
           "--clearenv"]
    if "--disable-userns" in flags:
        cmd.append("--disable-userns")
    for k, v in SANDBOX_ENV.items():
        cmd += ["--setenv", k, v]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        cmd += ["--ro-bind-try", f, f]
    for d in _interpreter_dirs(python):
        if not (d == "/usr" or d.startswith("/usr/")):
            cmd += ["--ro-bind", d, d]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    sized = "--size" in flags
    cmd += (["--perms", "1777"] if "--perms" in flags else []) + (
        ["--size", str(disk_mb << 20)] if sized else []) + ["--tmpfs", "/tmp"]
    cmd += (["--size", str(8 << 20)] if sized else []) + ["--tmpfs", "/dev/shm"]
    cmd += ["--dir", WORKDIR, "--file", str(program_fd), PROGRAM_PATH, "--chdir", WORKDIR]
    cmd += ["--remount-ro", "/"]  # bwrap's own root tmpfs (holding the mount points) read-only
    cmd += ["--info-fd", str(info_fd), "--json-status-fd", str(status_fd)]
    cmd += ["--", python, "-I", "-S", "-c", _BWRAP_INIT, json.dumps(limits), *argv]
    return cmd


# ------------------------------------------------------------------ the supervisor
class _Run:
    """One sandboxed process tree, driven from the caller: feeds stdin and the control pipe,
    reads stdout/stderr (bounded) and the status pipes, enforces the wall-clock timeout."""

    def __init__(self, backend: str, control: bytes, stdin: bytes, timeout_s: float,
                 max_output: int) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.max_output = max_output
        self.control = control
        self.stdin = stdin
        # control: the configuration (unshare) or the program text (bwrap --file), read by the
        # child; status: status lines (unshare) or --json-status-fd; info: bwrap's --info-fd.
        self.control_r, control_w = os.pipe()
        self.control_w: int | None = control_w
        self.status_r, self.status_w = os.pipe()
        self.info_r, self.info_w = os.pipe()
        self.init_pidfd: int | None = None
        self.status_lines: list[dict] = []

    def start(self, cmd: list[str]) -> None:
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(self.control_r, self.status_w, self.info_w), start_new_session=True,
                env=dict(SANDBOX_ENV), cwd="/", close_fds=True)
        except BaseException:
            for fd in (self.control_r, self.control_w, self.status_r, self.status_w,
                       self.info_r, self.info_w):
                os.close(fd)
            raise
        for fd in (self.control_r, self.status_w, self.info_w):
            os.close(fd)

    # The init (PID 1 of the sandbox) is killed through a pidfd opened while its parent (the
    # launcher / bwrap, which we have not reaped) still holds it: no pid-reuse race.
    def _open_init(self, pid: int) -> None:
        if self.init_pidfd is not None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            ppid = -1
        if ppid == self.proc.pid:
            self.init_pidfd = fd
        else:
            os.close(fd)

    def kill(self) -> None:
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # not started far enough to know its init: kill the whole session/group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> tuple[bytes, bytes, bool, bool]:
        """Drive the run to its end: (stdout, stderr, timed_out, output_truncated)."""
        try:
            return self._loop()
        finally:
            self._finish()

    def _loop(self) -> tuple[bytes, bytes, bool, bool]:
        sel = selectors.DefaultSelector()
        self._sel = sel
        out = {"stdout": bytearray(), "stderr": bytearray()}
        status_buf, info_buf = bytearray(), bytearray()
        pending = {"stdin": memoryview(self.stdin), "control": memoryview(self.control)}
        writers = {"stdin": self.proc.stdin.fileno(), "control": self.control_w}
        for name, fd in writers.items():
            if len(pending[name]):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_WRITE, name)
            else:
                self._close_writer(name)
        sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(self.status_r, selectors.EVENT_READ, "status")
        sel.register(self.info_r, selectors.EVENT_READ, "info")
        deadline = time.monotonic() + self.timeout_s
        kill_deadline: float | None = None  # set once killed: by then everything must be gone
        timed_out = truncated = False
        while sel.get_map():
            now = time.monotonic()
            if kill_deadline is None and now >= deadline:
                timed_out = True
                self.kill()
                kill_deadline = now + _KILL_GRACE_S
            if kill_deadline is not None and now >= kill_deadline:
                break  # _finish kills the launcher's whole process group
            wait = (deadline if kill_deadline is None else kill_deadline) - now
            for key, _ in sel.select(timeout=max(0.0, wait)):
                name = key.data
                if name in writers:
                    fd = writers[name]
                    try:
                        n = os.write(fd, pending[name][:1 << 16])
                    except OSError:  # the reader is gone (EPIPE): the rest is not wanted
                        n = len(pending[name])
                    pending[name] = pending[name][n:]
                    if not len(pending[name]):
                        sel.unregister(fd)
                        self._close_writer(name)
                    continue
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                elif name in out:
                    room = self.max_output - len(out[name])
                    out[name] += data[:room]
                    if len(data) > room and not truncated:
                        truncated = True
                        if kill_deadline is None:
                            self.kill()
                            kill_deadline = time.monotonic() + _KILL_GRACE_S
                elif name == "status":
                    status_buf += data
                    self._parse_status(status_buf)
                else:
                    info_buf += data
                    self._parse_info(info_buf)
        return bytes(out["stdout"]), bytes(out["stderr"]), timed_out, truncated

    def _finish(self) -> None:
        """Whatever happened (including an exception here): nothing of the run is left."""
        sel = getattr(self, "_sel", None)
        if sel is not None:
            sel.close()
        for name in ("stdin", "control"):
            self._close_writer(name)
        if self.proc.poll() is None:
            self.kill()
            try:
                self.proc.wait(timeout=_KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.init_pidfd is not None:
            # The init's pidfd turns readable once it, and so its whole namespace, has exited.
            import select

            if not select.select([self.init_pidfd], [], [], _KILL_GRACE_S)[0]:
                try:
                    signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([self.init_pidfd], [], [], _KILL_GRACE_S)
            os.close(self.init_pidfd)
            self.init_pidfd = None
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        for fd in (self.status_r, self.info_r):
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_writer(self, name: str) -> None:
        try:
            if name == "stdin":
                self.proc.stdin.close()
            elif self.control_w is not None:
                os.close(self.control_w)
                self.control_w = None
        except OSError:
            pass

    def _parse_status(self, buf: bytearray) -> None:
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._status_doc(line)

    def _parse_info(self, buf: bytearray) -> None:
        try:
            doc = json.loads(bytes(buf))
        except ValueError:
            return
        if "child-pid" in doc:
            self._open_init(int(doc["child-pid"]))

    def _status_doc(self, line: bytes) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            return
        self.status_lines.append(doc)
        if "init_pid" in doc:
            self._open_init(int(doc["init_pid"]))
        if "child-pid" in doc:
            self._open_init(int(doc["child-pid"]))


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _run_backend(backend: str, program: str, stdin: str, timeout_s: float, python: str,
                 limits: dict[str, int], disk_mb: int, max_output: int,
                 site_packages: bool) -> SandboxResult:
    t0 = time.monotonic()
    if site_packages:
        argv = [python, "-I", PROGRAM_PATH]
    else:
        argv = [python, "-I", "-S", "-c", _NO_SITE_BOOT, PROGRAM_PATH]
    if backend == "unshare":
        control = json.dumps({
            "parent_pid": os.getpid(), "program": program, "argv": argv, "env": SANDBOX_ENV,
            "limits": limits, "disk_mb": disk_mb, "expose": list(_interpreter_dirs(python)),
        }).encode()
        run = _Run(backend, control, stdin.encode(), timeout_s, max_output)
        cmd = [_HOST_PYTHON, "-I", "-S", _LAUNCHER_PATH, str(run.control_r), str(run.status_w)]
    else:
        if _bwrap_features() is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        run = _Run(backend, program.encode(), stdin.encode(), timeout_s, max_output)
        cmd = _bwrap_argv(python, run.control_r, run.info_w, run.status_w, argv, limits, disk_mb)
        cmd = [_HOST_PYTHON, "-I", "-S", _LAUNCHER_PATH, "--exec-bwrap", json.dumps({
            "parent_pid": os.getpid(), "argv": cmd, "expose": list(_interpreter_dirs(python))})]
    run.start(cmd)
    stdout, stderr, timed_out, truncated = run.run()
    seconds = time.monotonic() - t0

    error = None
    code: int | None = None
    sig: int | None = None
    for doc in run.status_lines:
        if "error" in doc:
            error = doc["error"]
        if "exit" in doc:
            code = doc["exit"]
        if "signal" in doc:
            sig = doc["signal"]
        if "exit-code" in doc:  # bwrap: 128 + signal when a signal ended the program
            c = int(doc["exit-code"])
            if 128 < c < 128 + 65:
                sig = c - 128
            else:
                code = c
    if timed_out or (truncated and code is None and sig is None):
        code, sig = None, int(signal.SIGKILL)  # we killed it
    if code is None and sig is None and error is None:
        error = (f"sandbox {backend} ended without a status (exit status "
                 f"{run.proc.returncode}): {_decode(stderr)[-500:]}")
    returncode = -int(sig) if sig is not None else (code if code is not None else -1)
    return SandboxResult(
        returncode=returncode, stdout=_decode(stdout), stderr=_decode(stderr),
        timed_out=timed_out, killed_by_signal=int(sig) if sig is not None else None,
        seconds=seconds, backend=backend, output_truncated=truncated, error=error)


_probe_lock = threading.Lock()
_probed: dict[tuple[str, str], str | None] = {}


def _probe(backend: str, python: str) -> str | None:
    """None when `backend` runs a trivial program here, else why not (cached per process)."""
    key = (backend, python)
    with _probe_lock:
        if key in _probed:
            return _probed[key]
        if backend == "bwrap" and _bwrap_features() is None:
            why: str | None = "bubblewrap (bwrap) is not installed"
        else:
            try:
                r = _run_backend(backend, "print('ok')", "", 30.0, python,
                                 _limits(30, 512, 32, 16, 64), 16, 1 << 20, False)
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


INSTALL_HINT = ("install bubblewrap (e.g. `apt install bubblewrap`) or allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1)")


def require_backend(python: str | None = None) -> str:
    """The backend code rewards will use here; SandboxUnavailable (one line: why each backend
    fails and what to install) when none works, so a run with code rewards refuses to start
    rather than losing every code sample."""
    python = python or DEFAULT_PYTHON
    reasons = {b: _probe(b, python) for b in BACKENDS}
    for b, why in reasons.items():
        if why is None:
            return b
    details = "; ".join(f"{b}: {' '.join(str(why).split())[:200]}" for b, why in reasons.items())
    raise SandboxUnavailable(f"no code sandbox works on this machine ({details}); {INSTALL_HINT}")


def run_sandboxed(program: str, *, stdin: str = "", timeout_s: float, memory_mb: int,
                  max_procs: int = 32, max_file_mb: int = 16, max_open_files: int = 64,
                  backend: str | None = None, python: str | None = None,
                  max_output_mb: int = 8, max_disk_mb: int = 64,
                  site_packages: bool = False) -> SandboxResult:
    """Run Python source `program` in a sandbox (see the module docstring) and report.

    The program reads `stdin` and runs in ``/tmp/work`` as ``/tmp/work/main.py``. Limits:
    `timeout_s` wall clock (and ``ceil(timeout_s) + 1`` CPU seconds per process), `memory_mb`
    address space per process, `max_procs` processes/threads for the sample, `max_file_mb` per
    file written, `max_open_files` descriptors, `max_output_mb` per output stream,
    `max_disk_mb` for everything written to /tmp. `backend`: "bwrap", "unshare" or None (the
    first of :func:`available_backends`). `python`: the interpreter (default
    :data:`DEFAULT_PYTHON`). Raises SandboxUnavailable when the chosen backend does not work
    here, ValueError on bad arguments.
    """
    if not isinstance(program, str) or not isinstance(stdin, str):
        raise ValueError("program and stdin must be str")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    for name, v in (("memory_mb", memory_mb), ("max_procs", max_procs),
                    ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                    ("max_output_mb", max_output_mb), ("max_disk_mb", max_disk_mb)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    python = python or DEFAULT_PYTHON
    if backend is None:
        reasons = {}
        for b in BACKENDS:
            reasons[b] = _probe(b, python)
            if reasons[b] is None:
                backend = b
                break
        else:
            raise SandboxUnavailable("no sandbox backend works here: " + "; ".join(
                f"{b}: {why}" for b, why in reasons.items()))
    else:
        why = _probe(backend, python)
        if why is not None:
            raise SandboxUnavailable(f"sandbox backend {backend!r} does not work here: {why}")
    limits = _limits(timeout_s, memory_mb, max_procs, max_file_mb, max_open_files)
    return _run_backend(backend, program, stdin, timeout_s, python, limits, max_disk_mb,
                        max_output_mb << 20, site_packages)
