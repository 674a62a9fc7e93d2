"""The code sandbox and the code reward.

Hostile programs (an infinite loop, a fork bomb, a memory bomb, a huge file write, network
connections, reading the parent's secret, writing outside the sandbox, signalling the parent, a
daemon that tries to outlive the run) are run under every backend that works here; each must be
contained within its limits while this test process and a benign sample running next to it are
unaffected, and no process of it may be left afterwards. Each containment's duration is printed.
Functional tests cover code_reward (extraction, comparison, fractions, asserts).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from r1mega.rewards.code import code_reward, code_reward_details, extract_program, normalize_output
from r1mega.rewards.sandbox import (
    SANDBOX_UID_BASE,
    BACKENDS,
    SandboxResult,
    SandboxUnavailable,
    available_backends,
    run_sandboxed,
)

AVAILABLE = available_backends()
REPO = Path(__file__).resolve().parents[1]
BENIGN = "a, b = map(int, input().split())\nprint(a + b)\n"


def _backend_params():
    return [pytest.param(b, marks=pytest.mark.skipif(
        b not in AVAILABLE, reason=f"sandbox backend {b!r} does not work here")) for b in BACKENDS]


backends = pytest.mark.parametrize("backend", _backend_params())
any_backend = pytest.mark.skipif(not AVAILABLE, reason="no sandbox backend works here")


def _sandbox_procs() -> dict[int, list[psutil.Process]]:
    """Processes under a sandbox uid (root runs both backends as SANDBOX_UID_BASE + a pid), by uid."""
    found: dict[int, list[psutil.Process]] = {}
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if uids is not None and uids.real >= SANDBOX_UID_BASE:
            found.setdefault(uids.real, []).append(p)
    return found


def _marker_procs(marker: str) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def canary():
    """A process of the test's own (root) that hostile programs must not be able to kill."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


class _Monitor(threading.Thread):
    """Peak process count and resident memory of the sandbox uids while a run is going on."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_procs = 0
        self.peak_rss_mb = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            for procs in _sandbox_procs().values():
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_procs = max(self.peak_procs, len(procs))
                self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            self.stop.wait(0.02)


def contain(capsys, backend: str, name: str, program: str, canary, *,
            peak_procs: int | None = None, peak_rss_mb: float | None = None,
            **kwargs) -> SandboxResult:
    """Run a hostile program next to a benign one; check nothing outside it was disturbed and
    (when given) that no sandbox uid ever had more than `peak_procs` processes / `peak_rss_mb`
    resident memory."""
    kwargs.setdefault("memory_mb", 256)
    benign: list[SandboxResult] = []
    done = threading.Event()

    def run_benign() -> None:
        while True:  # at least one benign sample, then more while the hostile one runs
            benign.append(run_sandboxed(BENIGN, stdin="2 3\n", timeout_s=30, memory_mb=256,
                                        backend=backend))
            if done.is_set():
                return

    neighbour = threading.Thread(target=run_benign)
    monitor = _Monitor()
    monitor.start()
    neighbour.start()
    result = run_sandboxed(program, backend=backend, **kwargs)
    done.set()
    neighbour.join()
    monitor.stop.set()
    monitor.join()

    with capsys.disabled():
        print(f"\n  containment [{backend:7}] {name:17} {result.seconds:6.3f} s  "
              f"(rc={result.returncode}, timed_out={result.timed_out}, peak "
              f"{monitor.peak_procs} procs / {monitor.peak_rss_mb:.0f} MiB; "
              f"{len(benign)} neighbour runs ok)", end="")
    assert result.backend == backend and result.error is None, result
    assert benign and all(r.ok and r.stdout == "5\n" for r in benign), benign
    assert canary.poll() is None, "the test's canary process was killed"
    assert not _sandbox_procs(), "a sandboxed process outlived its run"
    assert peak_procs is None or monitor.peak_procs <= peak_procs
    assert peak_rss_mb is None or monitor.peak_rss_mb <= peak_rss_mb
    return result


# ---------------------------------------------------------------------------------- hostile


@backends
def test_infinite_loop_is_killed_at_the_timeout(backend, capsys, canary):
    r = contain(capsys, backend, "infinite loop", "while True:\n    pass\n", canary, timeout_s=1.0)
    assert r.timed_out and r.killed_by_signal == signal.SIGKILL and r.returncode == -9
    assert 1.0 <= r.seconds < 30.0  # killed at its timeout (the bound only catches a hang)


@backends
def test_fork_bomb_stops_at_max_procs(backend, capsys, canary):
    # First a harmless version: 50 sleeping children against a limit of 16 processes.
    harmless = textwrap.dedent("""
        import os, time
        made = failed = 0
        for _ in range(50):
            try:
                pid = os.fork()
            except OSError:
                failed += 1
                continue
            if pid == 0:
                time.sleep(0.5)
                os._exit(0)
            made += 1
        print(made, failed)
    """)
    r = run_sandboxed(harmless, timeout_s=10, memory_mb=256, max_procs=16, backend=backend)
    made, failed = map(int, r.stdout.split())
    assert r.ok and made <= 15 and failed >= 35 and made + failed == 50, r

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    # at most 16 processes in the sandbox (+ the bwrap process outside it, same uid)
    r = contain(capsys, backend, "fork bomb", bomb, canary, timeout_s=2.0, max_procs=16,
                peak_procs=17)
    assert r.timed_out and 2.0 <= r.seconds < 30.0


@backends
def test_memory_bomb_stops_at_memory_mb(backend, capsys, canary):
    ok = run_sandboxed("x = b' ' * (100 << 20)\nprint(len(x))", timeout_s=10, memory_mb=256,
                       backend=backend)
    assert ok.ok and ok.stdout == f"{100 << 20}\n", ok  # below the limit: allowed
    bomb = "x = []\nwhile True:\n    x.append(b' ' * (16 << 20))\n"
    r = contain(capsys, backend, "memory bomb", bomb, canary, timeout_s=10.0, memory_mb=256,
                peak_rss_mb=256 + 32)  # + the sandbox's init
    assert not r.timed_out and r.returncode == 1 and "MemoryError" in r.stderr
    assert r.seconds < 60.0


@backends
def test_huge_file_write_stops_at_max_file_mb_and_disk(backend, capsys, canary):
    program = textwrap.dedent("""
        import os
        try:
            for i in range(100):  # fill the scratch space with files just under max_file_mb
                with open(f"fill{i}", "wb") as f:
                    f.write(b"x" * (15 << 20))
        except OSError as e:
            print("fill:", e.strerror, "after", i, "files", flush=True)
        for i in range(100):
            os.remove(f"fill{i}") if os.path.exists(f"fill{i}") else None
        with open("huge", "wb") as f:
            while True:
                f.write(b"\\0" * (1 << 20))
    """)
    r = contain(capsys, backend, "huge file write", program, canary, timeout_s=10.0,
                max_file_mb=16, max_disk_mb=64)
    assert "fill: No space left on device after 4 files" in r.stdout, r
    assert not r.timed_out and r.returncode == 1 and "File too large" in r.stderr, r


@backends
def test_network_is_unreachable(backend, capsys, canary):
    import errno

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    abstract = b"\0r1mega-test-" + secrets.token_hex(6).encode()  # per network namespace
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(abstract)
    unix.listen()
    unix.setblocking(False)
    program = textwrap.dedent(f"""
        import socket
        for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection(addr, timeout=3)
                print("connected", addr)
            except OSError as e:
                print("failed", e.errno)
        try:
            socket.socket(socket.AF_UNIX).connect({abstract!r})
            print("connected unix")
        except OSError as e:
            print("failed", e.errno)
    """)
    try:
        r = contain(capsys, backend, "network", program, canary, timeout_s=10.0)
        for listener in (server, unix):
            with pytest.raises(BlockingIOError):
                listener.accept()  # nothing reached the listeners in the host's namespace
    finally:
        server.close()
        unix.close()
    lines = r.stdout.split("\n")
    assert "connected" not in r.stdout and r.ok, r
    # loopback is down (unshare) or up but empty (bwrap); the internet has no route
    assert lines[0] in (f"failed {errno.ENETUNREACH}", f"failed {errno.ECONNREFUSED}"), r
    assert lines[1] == f"failed {errno.ENETUNREACH}", r
    assert lines[2] == f"failed {errno.ECONNREFUSED}", r


@backends
def test_the_parents_secret_is_not_readable(backend, capsys, canary, monkeypatch):
    secret = "r1mega-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("R1MEGA_SECRET", secret)
    program = textwrap.dedent(f"""
        import glob, os
        print(os.environ.get("R1MEGA_SECRET"), dict(os.environ))
        paths = ["/proc/self/environ", f"/proc/{{os.getppid()}}/environ", "/proc/1/environ",
                 "/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"]
        paths += glob.glob("/proc/*/environ") + glob.glob("/proc/*/task/*/environ")
        for path in paths + ["/etc/shadow"]:
            try:
                with open(path, "rb") as f:
                    print(path, f.read())
            except OSError as e:
                print(path, e.strerror)
    """)
    r = contain(capsys, backend, "secret", program, canary, timeout_s=10.0)
    assert r.ok and secret not in r.stdout and secret not in r.stderr, r
    assert r.stdout.startswith("None {'PATH'")
    assert r.stdout.endswith(("/etc/shadow Permission denied\n",  # unshare: not root
                              "/etc/shadow No such file or directory\n")), r  # bwrap: not bound


@backends
def test_writes_outside_the_work_dir_do_not_reach_the_host(backend, capsys, canary):
    tag = secrets.token_hex(6)
    targets = [f"/tmp/pwned-{tag}", str(REPO / f"pwned-{tag}"), f"/root/pwned-{tag}",
               f"/dev/shm/pwned-{tag}", f"/var/tmp/pwned-{tag}", f"/etc/pwned-{tag}",
               os.path.join(sys.prefix, f"pwned-{tag}"), os.path.expanduser(f"~/pwned-{tag}")]
    program = textwrap.dedent(f"""
        import os
        for path in {targets!r} + ["local-{tag}"]:
            try:
                with open(path, "w") as f:
                    f.write("pwned")
                print("wrote", path)
            except OSError as e:
                print("refused", path, e.strerror)
        print(os.path.exists("local-{tag}"), os.getcwd())
    """)
    r = contain(capsys, backend, "write outside", program, canary, timeout_s=10.0)
    assert r.ok and r.stdout.endswith("True /tmp/work\n"), r  # its own directory works
    left = [t for t in targets if os.path.exists(t)]
    assert not left, f"written on the host: {left}"
    for t in targets:  # whatever it could write went to its private tmpfs or nowhere
        assert f"wrote {t}" not in r.stdout or t.startswith(("/tmp/", "/dev/shm/")), r.stdout


@backends
def test_signalling_the_parent_does_nothing(backend, capsys, canary):
    me, parent = os.getpid(), os.getppid()
    program = textwrap.dedent(f"""
        import os, signal
        targets = [os.getppid(), 1, {me}, {parent}, {canary.pid}]
        targets += [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
        for pid in targets:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError as e:
                    pass
        try:
            os.killpg(os.getpgid({me}), signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(-1, signal.SIGKILL)  # everything it may signal (not itself)
        except OSError:
            pass
        print("still here")
    """)
    r = contain(capsys, backend, "signal parent", program, canary, timeout_s=10.0)
    assert r.ok and r.stdout == "still here\n", r
    assert psutil.pid_exists(me) and canary.poll() is None


@backends
@pytest.mark.parametrize("hang", [False, True], ids=["exits", "hangs"])
def test_a_daemonised_child_does_not_outlive_the_run(backend, hang, capsys, canary):
    marker = "r1mega-daemon-" + secrets.token_hex(8)
    program = textwrap.dedent(f"""
        import os, signal, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_IGN)
                os.execv(sys.executable, [sys.executable, "-c",
                         "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                         "time.sleep(60)", "{marker}"])
            os._exit(0)
        while not any(b"{marker}" in open(f"/proc/{{p}}/cmdline", "rb").read()
                      for p in os.listdir("/proc") if p.isdigit()):
            time.sleep(0.01)
        print("daemon started")
        sys.stdout.flush()
        while {hang}:
            pass
    """)
    name = "daemon (" + ("hangs" if hang else "exits") + ")"
    r = contain(capsys, backend, name, program, canary, timeout_s=1.5)
    assert r.stdout == "daemon started\n", r
    assert r.timed_out == hang and (r.ok or hang), r
    assert not _marker_procs(marker), "the daemon outlived the sandbox"


@backends
def test_output_flood_is_cut_at_max_output_mb(backend, capsys, canary):
    r = contain(capsys, backend, "output flood", "while True:\n    print('x' * 4096)\n", canary,
                timeout_s=10.0, max_output_mb=1)
    assert r.output_truncated and not r.ok and len(r.stdout) == 1 << 20 and r.seconds < 60.0


@backends
def test_killing_the_caller_kills_the_sandbox(backend):
    """A reward worker killed mid-run (RewardPool's deadline) leaves no sandbox behind."""
    marker = "r1mega-orphan-" + secrets.token_hex(8)
    caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from r1mega.rewards.sandbox import run_sandboxed
        run_sandboxed("import time\\ntime.sleep(60)  # {marker}\\n", timeout_s=60,
                      memory_mb=256, backend={backend!r})
    """)])
    try:
        deadline = time.monotonic() + 20
        while not _marker_procs(marker):
            assert time.monotonic() < deadline and caller.poll() is None, "sandbox never started"
            time.sleep(0.02)
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while _marker_procs(marker) or _sandbox_procs():
        assert time.monotonic() < deadline, "the sandbox survived its caller"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- sandbox


@backends
def test_run_sandboxed_basics(backend):
    r = run_sandboxed("import sys\nprint(input()[::-1])\nprint('err', file=sys.stderr)\n"
                      "sys.exit(3)", stdin="abc\n", timeout_s=10, memory_mb=256, backend=backend)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_by_signal) == \
        (3, "cba\n", "err\n", False, None)
    assert r.backend == backend and not r.ok and r.seconds < 60
    r = run_sandboxed("import os\nos.kill(os.getpid(), 9)", timeout_s=10, memory_mb=256,
                      backend=backend)
    assert r.returncode == -9 and r.killed_by_signal == 9 and not r.timed_out
    # a stdin larger than a pipe buffer, and an output just under the cap
    big = "".join(f"{i}\n" for i in range(200_000))
    r = run_sandboxed("import sys\nd = sys.stdin.read()\nprint(len(d))\nprint('y' * 500000)",
                      stdin=big, timeout_s=10, memory_mb=256, backend=backend)
    assert r.ok and r.stdout == f"{len(big)}\n{'y' * 500000}\n"
    # the interpreter is isolated: no site-packages (the trainer's install), no PYTHON* variables
    r = run_sandboxed("import sys\nprint(sys.flags.isolated, sys.flags.no_site)\n"
                      "try:\n    import r1mega\nexcept ImportError:\n    print('no r1mega')",
                      timeout_s=10, memory_mb=256, backend=backend)
    assert r.stdout == "1 1\nno r1mega\n", r
    # ... yet it runs as __main__, with the builtins site adds (exit, quit), and its tracebacks
    # name its file and line
    r = run_sandboxed("import sys\nprint(__name__, __file__, sys.argv)\nif True:\n    exit(4)",
                      timeout_s=10, memory_mb=256, backend=backend)
    assert (r.returncode, r.stdout) == (4, "__main__ /tmp/work/main.py ['/tmp/work/main.py']\n")
    r = run_sandboxed("from __future__ import annotations\nx = 1\n1 / 0", timeout_s=10,
                      memory_mb=256, backend=backend)
    assert r.returncode == 1 and 'File "/tmp/work/main.py", line 3' in r.stderr, r


@backends
def test_concurrent_runs_are_independent(backend):
    results: dict[int, SandboxResult] = {}

    def one(i: int) -> None:
        prog = f"open('f', 'w').write('{i}')\nprint(int(input()) * {i}, open('f').read())"
        results[i] = run_sandboxed(prog, stdin="7\n", timeout_s=30, memory_mb=256,
                                   backend=backend)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{7 * i} {i}\n" for i in range(8)}


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="timeout_s"):
        run_sandboxed("pass", timeout_s=0, memory_mb=256)
    with pytest.raises(ValueError, match="memory_mb"):
        run_sandboxed("pass", timeout_s=1, memory_mb=0)
    with pytest.raises(ValueError, match="backend"):
        run_sandboxed("pass", timeout_s=1, memory_mb=256, backend="docker")
    if "bwrap" not in AVAILABLE:
        with pytest.raises(SandboxUnavailable):
            run_sandboxed("pass", timeout_s=1, memory_mb=256, backend="bwrap")


# ---------------------------------------------------------------------------------- code reward


def fenced(code: str, lang: str = "python") -> str:
    return f"Let me think.\n```{lang}\n{code}```\nDone."


ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
IO_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"},
            {"input": "0 0", "output": "0\n\n"}]


def test_extract_program():
    assert extract_program(fenced("x = 1\n")) == "x = 1\n"
    assert extract_program("```\nfirst\n```\ntext\n```py\nsecond\n```") == "second\n"
    assert extract_program("```python\nmine\n```\n```text\nsample output\n```") == "mine\n"
    assert extract_program("<think>t</think> <answer>```python\nprint(1)\n```</answer>") == "print(1)\n"
    assert extract_program("<answer>```python print(1)```</answer>") is None  # no block without a newline
    assert extract_program("```python\nmine\n```\nOutput:\n```\n3\n```") == "mine\n"
    assert extract_program("```cpp\nint main() {}\n```") is None
    assert extract_program("no code here") is None
    assert extract_program("```python\nunterminated\n") is None


def test_normalize_output():
    assert normalize_output("1 2  \r\n3\t\n\n\n") == "1 2\n3"
    assert normalize_output("a\n b") == "a\n b"  # leading whitespace counts


@any_backend
def test_code_reward_io_tests():
    assert code_reward(fenced(ADD), IO_TESTS, timeout_s=10, memory_mb=256) == 1.0
    wrong = "a, b = map(int, input().split())\nprint(a - b)\n"  # right only for 0 0
    assert code_reward(fenced(wrong), IO_TESTS, timeout_s=10, memory_mb=256) == pytest.approx(1 / 3)
    # trailing whitespace on lines and at the end is ignored; other whitespace is not
    spaced = "a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()\n"
    assert code_reward(fenced(spaced), IO_TESTS, timeout_s=10, memory_mb=256) == 1.0
    ends_with_exit = "a, b = map(int, input().split())\nprint(a + b)\nexit()\n"
    assert code_reward(fenced(ends_with_exit), IO_TESTS, timeout_s=10, memory_mb=256) == 1.0
    leading = "a, b = map(int, input().split())\nprint('', a + b)\n"
    assert code_reward(fenced(leading), IO_TESTS, timeout_s=10, memory_mb=256) == 0.0


@any_backend
def test_code_reward_assert_tests():
    prog = "def f(x):\n    return x * x\n"
    tests = ({"assert": "assert f(2) == 4"}, {"assert": "assert f(3) == 9\nassert f(-1) == 1"},
             {"assert": "assert f(2) == 5"})
    assert code_reward(fenced(prog), tests, timeout_s=10, memory_mb=256) == pytest.approx(2 / 3)
    mixed = [{"assert": "assert f(2) == 4"}, {"input": "", "output": ""}]
    assert code_reward(fenced(prog), mixed, timeout_s=10, memory_mb=256) == 1.0
    # exiting before the asserts run does not pass them
    for escape in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        value, info = code_reward_details(fenced(prog + escape), tests, timeout_s=10,
                                          memory_mb=256)
        assert value == 0.0 and info["passed"] == 0


@any_backend
def test_code_reward_failures_score_zero():
    assert code_reward(fenced("print(1 +)\n"), IO_TESTS, timeout_s=10, memory_mb=256) == 0.0
    value, info = code_reward_details("I would write a loop.", IO_TESTS, timeout_s=10,
                                      memory_mb=256)
    assert value == 0.0 and info["error"] == "no code block" and info["tests"] == []
    value, info = code_reward_details(fenced("while True:\n    pass\n"), IO_TESTS[:1],
                                      timeout_s=0.5, memory_mb=256)
    assert value == 0.0 and info["tests"][0]["timed_out"] and info["tests"][0]["returncode"] == -9
    value, info = code_reward_details(fenced("print(1 +)\n"), IO_TESTS[:1], timeout_s=10,
                                      memory_mb=256)
    assert "SyntaxError" in info["tests"][0]["stderr_tail"]
    assert not info["tests"][0]["passed"] and info["passed"] == 0 and info["total"] == 1


def test_code_reward_rejects_bad_tests():
    with pytest.raises(ValueError, match="empty"):
        code_reward(fenced(ADD), [])
    with pytest.raises(ValueError, match="input"):
        code_reward(fenced(ADD), [{"stdin": "1"}])
    with pytest.raises(ValueError, match="list"):
        code_reward(fenced(ADD), "assert True")


def _link_this_environment(venv: Path) -> None:
    """Make the fresh `venv` see exactly this interpreter's environment: a .pth file in its
    site-packages adds this interpreter's site directories (with site.addsitedir, so that their own
    .pth files, the editable install's among them, run too) and then every other directory on this
    sys.path. `--system-site-packages` would not do: made from an interpreter that is itself a
    venv, the new venv's base is the *base* interpreter, whose site-packages lack this venv's."""
    import site
    import sysconfig

    sites = [d for d in site.getsitepackages() if os.path.isdir(d)]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        sites.append(site.getusersitepackages())
    stdlib = {os.path.realpath(sysconfig.get_path(k)) for k in ("stdlib", "platstdlib")}
    extra = [d for d in sys.path if d and os.path.isdir(d) and d not in sites
             and os.path.realpath(d) not in stdlib and "lib-dynload" not in d]
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    purelib.mkdir(parents=True, exist_ok=True)
    # One `import` line, which site executes at start-up (addsitedir skips directories already
    # on sys.path and runs the .pth files of the ones it adds; a plain directory is just appended).
    (purelib / "_r1mega_test_parent_env.pth").write_text(
        f"import site; list(map(site.addsitedir, {list(dict.fromkeys(sites + extra))!r}))\n")


def test_runs_from_a_virtual_environment_under_tmp(tmp_path):
    # A venv under /tmp is hidden by the sandbox's private /tmp; its base interpreter must be used.
    if not AVAILABLE:
        pytest.skip("no sandbox backend works here")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _link_this_environment(venv)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import sys, r1mega; print(sys.prefix, r1mega.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[0] == str(venv)  # it runs as the new venv, not as this interpreter
    code = ("from r1mega.rewards.sandbox import run_sandboxed; "
            "r = run_sandboxed('print(6 * 7)', timeout_s=10, memory_mb=256); print(r.stdout.strip(), r.error)")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "42", out.stdout
