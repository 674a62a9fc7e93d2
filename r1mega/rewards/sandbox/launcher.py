"""The sandbox's own processes: the launcher, the unshare backend's root file system, and the
runner that is PID 1 of every sandbox. Standard library only, run as a script, never imported
with r1mega's dependencies (it runs as root, in namespaces where site-packages do not exist).

Modes (``python -I -S launcher.py MODE ...``):

``--unshare CFG_FD RESULTS_FD``
    The "unshare" backend (root): read the configuration (JSON) from CFG_FD, join the sample's
    cgroups, unshare mount, network, PID, IPC and UTS namespaces and fork the namespace's init,
    which builds a root file system from nothing (:func:`build_root`), pivots into it and execs
    the runner as PID 1. The launcher waits until the namespace is empty.
``--exec-bwrap JSON``
    The "bwrap" backend: join the sample's cgroups, as root become a per-run unprivileged uid
    (exposing the interpreter first when it lives under a directory others cannot enter), and
    exec bubblewrap, whose PID 1 is the runner.
``--runner JOB_FD RESULTS_FD UID`` (passed as ``-c`` source, inside the sandbox)
    PID 1 of the sandbox: read the job (programs and cases) from JOB_FD and run its cases one
    after the other, each in a fresh process forked from the runner (no interpreter start per
    case) with its own stdin, bounded stdout/stderr, wall-clock timeout, rlimits and seccomp
    filter. Between cases every other process of the namespace is killed (``kill(-1)`` from
    PID 1) and the scratch space is wiped, so each case's verdict is its own. One JSON line per
    case goes to RESULTS_FD. The runner is not dumpable: programs cannot read its memory, file
    descriptors or environment through /proc, nor ptrace it (seccomp denies ptrace anyway).
"""

from __future__ import annotations

import marshal  # the protocol with the caller: builtin, unlike json (a costly import per sample)
import os
import resource  # before any mount can hide the interpreter's lib-dynload
import select
import signal
import sys
import time

SANDBOX_UID_BASE = 1_900_000_000  # above systemd's container range, below 2**31
"""Programs of the unshare backend (and bwrap run by root) run as ``SANDBOX_UID_BASE + pid``."""
WORKDIR = "/tmp/work"
PROGRAM_PATH = WORKDIR + "/main.py"
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": WORKDIR,
}
# What a Python program needs of the host, beyond its interpreter's own directories.
ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ROOT_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")
DEVICES = ("null", "zero", "full", "random", "urandom")

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38
_SECCOMP_MODE_FILTER = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_MOUNT_SETATTR = 442  # the same on every architecture but alpha
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_AT_RECURSIVE, _AT_FDCWD = 0x8000, -100


class Libc:
    """The few system calls the standard library lacks (through ctypes)."""

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

    def umount_detach(self, target: str) -> None:
        self._check(self.lib.umount2(target.encode(), self.ctypes.c_int(_MNT_DETACH)),
                    f"umount {target}")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        c = self.ctypes
        self._check(self.lib.syscall(c.c_long(_SYS_PIVOT_ROOT[os.uname().machine]),
                                     new_root.encode(), put_old.encode()), "pivot_root")

    def sethostname(self, name: str) -> None:
        b = name.encode()
        self._check(self.lib.sethostname(b, self.ctypes.c_size_t(len(b))), "sethostname")

    def make_readonly(self, path: str) -> None:
        """Every mount at or under `path` read-only, nosuid and nodev."""
        c = self.ctypes
        attr = (c.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
        rc = self.lib.syscall(c.c_long(_SYS_MOUNT_SETATTR), c.c_int(_AT_FDCWD), path.encode(),
                              c.c_uint(_AT_RECURSIVE), c.byref(attr), c.c_size_t(32))
        if rc == 0:
            return
        # Kernels before 5.12: remount each mount point at or under `path`, one by one.
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
        for point in points:
            if point == path or point.startswith(path.rstrip("/") + "/"):
                keep = os.statvfs(point).f_flag & _MS_NOEXEC
                self.mount(None, point, None,
                           _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep)

    def install_seccomp(self, program: bytes) -> None:
        c = self.ctypes

        class SockFprog(c.Structure):
            _fields_ = [("len", c.c_ushort), ("filter", c.c_void_p)]

        buf = c.create_string_buffer(program, len(program))
        prog = SockFprog(len(program) // 8, c.addressof(buf))
        self._check(self.lib.prctl(c.c_int(_PR_SET_SECCOMP), c.c_ulong(_SECCOMP_MODE_FILTER),
                                   c.c_void_p(c.addressof(prog)), c.c_ulong(0), c.c_ulong(0)),
                    "prctl(PR_SET_SECCOMP)")


def hidden_ancestor(path: str) -> str | None:
    """The topmost ancestor directory of `path` that others cannot enter, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _expose(libc: Libc, paths: list[str]) -> None:
    """Make each of `paths` reachable by other users when an ancestor is closed to them (pyenv
    under /root, mode 0700): that ancestor is replaced by an empty read-only tmpfs holding only
    `paths`, bind-mounted at their own place. Needs a private mount namespace and /tmp."""
    tops = {a for a in map(hidden_ancestor, paths) if a is not None}
    tops = {t for t in tops if not any(t.startswith(o + "/") for o in tops)}  # outermost only
    for n, top in enumerate(sorted(tops)):
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


def build_root(libc: Libc, new_root: str, binds: list[str], disk_mb: int) -> None:
    """Build the sandbox's root file system from nothing and pivot into it (unshare backend).

    A 1 MiB tmpfs at `new_root` receives, read-only: the directories in :data:`ROOT_DIRS` that
    exist (symlinks recreated as symlinks), `binds` (the interpreter's directories), the files
    in :data:`ROOT_FILES`; a new /proc; a /dev of its own (null, zero, full, random, urandom,
    the fd links, an 8 MiB /dev/shm); /tmp, a tmpfs of `disk_mb`. Nothing else of the host
    exists inside: no /home, /root, /etc, /run, /sys, /work, no repository, no data. The old
    root is detached and the new root's own tmpfs remounted read-only.
    """
    libc.mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")

    def inside(p: str) -> str:
        return new_root + p

    def bind_dir(src: str) -> None:
        os.makedirs(inside(src), 0o755, exist_ok=True)
        libc.mount(src, inside(src), None, _MS_BIND | _MS_REC)
        libc.make_readonly(inside(src))

    for top in ROOT_DIRS:
        if os.path.islink(top):
            os.symlink(os.readlink(top), inside(top))
        elif os.path.isdir(top):
            bind_dir(top)
    for d in binds:
        if not any(d == t or d.startswith(t + "/") for t in ROOT_DIRS):
            bind_dir(d)
    for f in ROOT_FILES:
        if os.path.isfile(f):
            os.makedirs(os.path.dirname(inside(f)), 0o755, exist_ok=True)
            open(inside(f), "w").close()
            libc.mount(f, inside(f), None, _MS_BIND)
            libc.mount(None, inside(f), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)
    os.mkdir(inside("/proc"))
    libc.mount("proc", inside("/proc"), "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(inside("/dev"))
    libc.mount("tmpfs", inside("/dev"), "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        open(inside("/dev/" + name), "w").close()
        libc.mount("/dev/" + name, inside("/dev/" + name), None, _MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", inside("/dev/" + name))
    os.symlink("/proc/self/fd", inside("/dev/fd"))
    os.mkdir(inside("/dev/shm"))
    libc.mount("tmpfs", inside("/dev/shm"), "tmpfs", _MS_NOSUID | _MS_NODEV, "size=8m,mode=1777")
    os.mkdir(inside("/tmp"))
    libc.mount("tmpfs", inside("/tmp"), "tmpfs", _MS_NOSUID | _MS_NODEV,
               f"size={disk_mb}m,mode=1777")
    os.chdir(new_root)
    libc.pivot_root(".", ".")  # the old root stays stacked under the new one ...
    libc.umount_detach(".")    # ... until detached here
    os.chdir("/")
    libc.mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def join_cgroups(procs_files: list[str]) -> None:
    """Move this process (and so everything it starts) into the sample's cgroups."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _drop_privileges(libc: Libc, uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(_PR_SET_PDEATHSIG, 9)  # a change of uid clears it


def send(fd: int, doc: dict) -> None:
    """Write one record to the caller: a 4-byte little-endian length, then ``marshal`` data
    (plain dicts of str, bytes, int, float, bool, None; readable across Python versions)."""
    data = marshal.dumps(doc, 4)
    os.write(fd, len(data).to_bytes(4, "little") + data)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# The runner: PID 1 of the sandbox.
# ------------------------------------------------------------------------------------------------
class Program:
    """The program of a case, run in the process forked for it."""

    def __init__(self, path: str, source: str) -> None:
        self.path, self.source = path, source

    def run(self) -> None:
        """Run the program as a fresh interpreter's ``__main__`` would, then exit: SystemExit
        codes, tracebacks on stderr (the program's frames only), waiting for non-daemon
        threads, atexit handlers and flushing stdio all behave as at a normal interpreter exit;
        only the tearing down of modules is skipped (it would cost milliseconds per case)."""
        import types

        path = self.path
        main = types.ModuleType("__main__")
        main.__file__ = path
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        sys.argv[:] = [path]

        def excepthook(kind, value, tb):
            while tb is not None and tb.tb_frame.f_code.co_filename != path:
                tb = tb.tb_next
            sys.__excepthook__(kind, value.with_traceback(tb), tb)

        sys.excepthook = excepthook
        status = 0
        try:
            code = compile(self.source, path, "exec")
            del self.source
            exec(code, main.__dict__)
        except SystemExit as e:
            status = _exit_status(e.code)
        except BaseException:  # noqa: BLE001 - reported as python reports it
            sys.excepthook(*sys.exc_info())
            status = 1
        try:
            threading = sys.modules.get("threading")
            if threading is not None:
                threading._shutdown()  # joins non-daemon threads, as Py_FinalizeEx does
            import atexit

            atexit._run_exitfuncs()
        except SystemExit as e:
            status = _exit_status(e.code)
        except BaseException:  # noqa: BLE001
            sys.excepthook(*sys.exc_info())
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - python exits 120 when stdio cannot be flushed
                status = status or 120
        os._exit(status)


def _exit_status(code) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _wipe(top: str) -> None:
    """Remove everything under `top` (a program may have closed a directory to its owner)."""
    for root, dirs, files in os.walk(top, topdown=True):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
            except OSError:
                pass
    for root, dirs, files in os.walk(top, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            p = os.path.join(root, name)
            if os.path.islink(p):
                os.unlink(p)
            else:
                os.rmdir(p)


def _prepare_workdir(source: str, uid: int | None) -> None:
    for top in ("/tmp", "/dev/shm"):
        if os.path.isdir(top):
            _wipe(top)
    os.mkdir(WORKDIR, 0o700)
    with open(PROGRAM_PATH, "w", encoding="utf-8") as f:
        f.write(source)
    if uid is not None:
        os.chown(WORKDIR, uid, uid)
        os.chown(PROGRAM_PATH, uid, uid)


def _enter_program(fds: tuple[int, int, int], uid: int | None, limits: dict) -> None:
    """In the forked case process: become the program (stdio, uid, limits). NO_NEW_PRIVS and the
    seccomp filter are the runner's own, inherited; when the runner (PID 1) dies, the kernel
    kills every process of its namespace."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, 1 << 20)
    os.chdir(WORKDIR)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    for name, value in limits.items():
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, then SIGKILL
        resource.setrlimit(getattr(resource, name), (value, hard))


def _kill_others(pid: int) -> None:
    """Kill every process of the namespace but this one (PID 1): the case's program and anything
    it left behind (daemons, process groups of their own). Outside a PID namespace of our own
    (never expected) only the program's session is killed."""
    try:
        if os.getpid() == 1:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap_all(pid: int) -> int | None:
    """Wait for every child (orphans are re-parented to PID 1); the program's wait status."""
    status = None
    while True:
        try:
            p, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return status
        if p == pid:
            status = st


def _run_case(job: dict, case: dict, uid: int | None) -> dict:
    source = job["programs"][case["program"]]
    _prepare_workdir(source, uid)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _enter_program((stdin_r, out_w, err_w), uid, job["limits"])
        except BaseException as e:  # noqa: BLE001 - report whatever stopped the start
            os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
            os._exit(127)
        Program(PROGRAM_PATH, source).run()  # never returns
    for fd in (stdin_r, out_w, err_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    max_output = job["max_output"]
    out = {out_r: bytearray(), err_r: bytearray()}
    pending = memoryview(case["stdin"].encode())
    if len(pending):
        os.set_blocking(stdin_w, False)
    else:
        os.close(stdin_w)
        stdin_w = -1
    poller = select.poll()
    for fd in out:
        poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    if stdin_w >= 0:
        poller.register(stdin_w, select.POLLOUT)
    deadline = start + case["timeout_s"]
    timed_out = truncated = exited = False
    open_reads = set(out)

    def read(fd: int) -> None:
        nonlocal truncated
        data = os.read(fd, 1 << 16)
        if not data:
            poller.unregister(fd)
            open_reads.discard(fd)
            return
        room = max_output - len(out[fd])
        out[fd] += data[:max(room, 0)]
        if len(data) > room:
            truncated = True

    while not (exited or truncated):
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for fd, ev in poller.poll(left * 1000):
            if fd == pidfd:
                exited = True
            elif fd == stdin_w:
                try:
                    n = os.write(fd, pending[:1 << 16])
                except OSError:  # the program closed its stdin: the rest is not wanted
                    n = len(pending)
                pending = pending[n:]
                if not len(pending):
                    poller.unregister(fd)
                    os.close(fd)
                    stdin_w = -1
            elif fd in open_reads:
                read(fd)
    seconds = time.monotonic() - start
    _kill_others(pid)
    status = _reap_all(pid)
    if stdin_w >= 0:
        os.close(stdin_w)
    for fd in list(open_reads):  # every writer is dead now: read to EOF, still bounded
        os.set_blocking(fd, True)
        while fd in open_reads and not truncated:
            read(fd)
    for fd in out:
        os.close(fd)
    os.close(pidfd)
    result = {"seconds": seconds, "timed_out": timed_out, "truncated": truncated,
              "stdout": bytes(out[out_r]), "stderr": bytes(out[err_r])}
    if status is not None and os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    elif status is not None:
        result["exit"] = os.WEXITSTATUS(status)
    return result


def runner_main(job_fd: int, results_fd: int, uid: int | None) -> int:
    """PID 1 of the sandbox: run every case of the job (see the module docstring)."""
    libc = Libc()
    libc.prctl(_PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job = marshal.loads(_read_all(job_fd))
    if not job["site_packages"]:  # the builtins site adds (exit, quit, help): programs use exit()
        import builtins

        import _sitebuiltins  # what site.setquit() and site.sethelper() use, without site's imports

        builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
        builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
        builtins.help = _sitebuiltins._Helper()
        builtins.copyright = _sitebuiltins._Printer("copyright", sys.copyright)
        builtins.credits = _sitebuiltins._Printer("credits", "See https://www.python.org/about/credits/")
        builtins.license = _sitebuiltins._Printer("license", "See https://www.python.org/psf/license/")
    # Once, here: every case process inherits both. The runner itself never makes a call the
    # filter denies (fork is clone without namespace flags; setresuid, kill, wait, pipes, files).
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if job["seccomp"]:
        libc.install_seccomp(job["seccomp"])
    import gc

    gc.freeze()  # the runner's objects: out of every case's collections (fewer copy-on-write faults)
    for i, case in enumerate(job["cases"]):
        result = _run_case(job, case, uid)
        result["case"] = i
        send(results_fd, result)
    return 0


# ------------------------------------------------------------------------------------------------
# The launchers.
# ------------------------------------------------------------------------------------------------
def _unshare_main(cfg_fd: int, results_fd: int) -> int:
    libc = Libc()
    libc.prctl(_PR_SET_PDEATHSIG, 9)  # the caller dies -> the launcher dies -> PID 1 dies
    cfg = marshal.loads(_read_all(cfg_fd))
    if os.getppid() != cfg["parent_pid"]:
        return 1  # the caller is already gone

    def report(**kw) -> None:
        send(results_fd, kw)

    try:
        join_cgroups(cfg["cgroup_procs"])
        libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS)
    except OSError as e:
        report(error=f"{e} (the unshare backend needs root)")
        return 0
    uid = SANDBOX_UID_BASE + os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(_PR_SET_PDEATHSIG, 9)
            libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
            build_root(libc, cfg["mount_point"], cfg["binds"], cfg["disk_mb"])
            libc.sethostname("sandbox")
            if cfg["runner"] is None:  # the same interpreter and flags: run it here, no exec
                return runner_main(cfg["job_fd"], results_fd, uid)
            os.execve(cfg["runner"][0], cfg["runner"] + [str(uid)], cfg["env"])
        except BaseException as e:  # noqa: BLE001
            report(error=f"sandbox setup failed: {e!r}")
        os._exit(1)
    report(init_pid=pid, uid=uid)
    os.waitpid(pid, 0)  # returns once PID 1 and, with it, every process of the namespace is gone
    return 0


def _exec_bwrap_main(cfg_hex: str) -> int:
    """Exec bubblewrap so that it dies with the caller; as root, first become a per-run uid.

    bwrap run by root keeps uid 0 outside its user namespace, where RLIMIT_NPROC never applies;
    run by an unprivileged uid, the limit counts the sandbox's own user namespace. The
    parent-death signal (kept across exec) kills bwrap, and so the sandbox, with the caller.
    """
    libc = Libc()
    libc.prctl(_PR_SET_PDEATHSIG, 9)
    cfg = marshal.loads(bytes.fromhex(cfg_hex))
    if os.getppid() != cfg["parent_pid"]:
        return 1
    try:
        join_cgroups(cfg["cgroup_procs"])
        if os.geteuid() == 0:
            if any(hidden_ancestor(p) for p in cfg["expose"]):
                libc.unshare(_CLONE_NEWNS)
                libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)
                libc.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0700")
                _expose(libc, cfg["expose"])
            _drop_privileges(libc, SANDBOX_UID_BASE + os.getpid())
            if os.getppid() != cfg["parent_pid"]:
                return 1
        os.execv(cfg["argv"][0], cfg["argv"])
    except OSError as e:
        os.write(2, f"sandbox: cannot start bwrap: {e}\n".encode())
        return 126
    return 127


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "--runner":
        uid = int(argv[3])
        return runner_main(int(argv[1]), int(argv[2]), uid if uid >= 0 else None)
    if mode == "--unshare":
        return _unshare_main(int(argv[1]), int(argv[2]))
    if mode == "--exec-bwrap":
        return _exec_bwrap_main(argv[1])
    os.write(2, f"sandbox launcher: unknown mode {mode!r}\n".encode())
    return 2


def exit_with(status: int) -> None:
    """Exit without the interpreter's shutdown (it would cost milliseconds per sample)."""
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_with(main(sys.argv[1:]))
