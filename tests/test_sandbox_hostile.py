"""The sandbox against a policy that reads, probes and escapes: every attempt is contained under
every backend that works here, with the caller and a neighbouring sample unaffected and nothing
left running or written outside (see tests/test_sandbox.py for `contain`). Also: the seccomp
filter against the kernel's own syscall tables and in a process of its own, the per-sample
cgroup, and the cases of one sandbox staying independent of each other."""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from r1mega.rewards import sandbox
from r1mega.rewards.code import code_reward_details
from r1mega.rewards.sandbox import cgroups, run_cases, seccomp
from tests.test_sandbox import backends, canary, contain  # noqa: F401 - canary is a fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def training_data():
    """A training-data file with expected outputs, where a trainer would keep one (the repo)."""
    token = "r1mega-expected-output-" + secrets.token_hex(8)
    path = REPO / "build" / f"hostile-data-{secrets.token_hex(4)}.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"prompt": "p", "tests": [{"input": "", "output": token}]}) + "\n")
    yield path, token
    path.unlink()


def _json_line(r) -> dict:
    assert r.ok, r
    return json.loads(r.stdout.strip().splitlines()[-1])


@backends
def test_the_data_and_the_repository_are_not_there(backend, capsys, canary, training_data):
    path, token = training_data
    interpreter = sandbox.backends.interpreter_dirs(sandbox.DEFAULT_PYTHON)
    program = textwrap.dedent(f"""
        import json, os
        found = {{}}
        for p in [{str(path)!r}, {str(REPO / "README.md")!r}, {str(REPO / "r1mega" / "__init__.py")!r},
                  "/etc/passwd", "/etc/hostname", "/sys/kernel", "/run", "/home", "/work"]:
            try:
                with open(p, "rb") as f:
                    found[p] = f.read(200).decode("latin-1")
            except OSError as e:
                found[p] = e.errno
        seen = []
        skip = {{"/proc", "/usr", *{list(interpreter)!r}}}
        for root, dirs, files in os.walk("/"):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
            seen += [os.path.join(root, f) for f in files]
        print(json.dumps({{"found": found, "top": sorted(os.listdir("/")), "seen": seen}}))
    """)
    r = contain(capsys, backend, "read data/repo", program, canary, timeout_s=20.0)
    doc = _json_line(r)
    assert token not in r.stdout
    assert all(v in (errno.ENOENT, errno.EACCES) for v in doc["found"].values()), doc["found"]
    assert set(doc["top"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root",
                               "sbin", "tmp", "usr"} | {p.split("/")[1] for p in
                                                        sandbox.backends.interpreter_dirs(sandbox.DEFAULT_PYTHON)}
    # outside /usr, /proc and the interpreter: /etc's loader files, /dev, the program
    strays = [p for p in doc["seen"] if not (
        p.startswith(("/dev/", "/tmp/work/")) or p in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime")
        or any(p.startswith(d + "/") for d in interpreter))]
    assert not strays, strays[:20]


@backends
def test_proc_walks_and_the_parents_descriptors_lead_nowhere(backend, capsys, canary, training_data):
    path, token = training_data
    program = textwrap.dedent(f"""
        import json, os
        out = {{}}
        def probe(name, fn):
            try:
                out[name] = fn()
            except OSError as e:
                out[name] = e.errno
        probe("proc1_root", lambda: os.listdir("/proc/1/root"))
        probe("proc1_cwd", lambda: os.readlink("/proc/1/cwd"))
        probe("proc1_fd", lambda: os.listdir("/proc/1/fd"))
        probe("proc1_mem", lambda: open("/proc/1/mem", "rb").read(1).hex())
        probe("proc1_environ", lambda: open("/proc/1/environ", "rb").read().decode())
        probe("self_cwd", lambda: sorted(os.listdir("/proc/self/cwd")))
        probe("self_root", lambda: sorted(os.listdir("/proc/self/root")))
        probe("data_via_root", lambda: open("/proc/self/root" + {str(path)!r}).read())
        probe("pids", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        fds = []
        for fd in range(3, 4096):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                pass
        out["open_fds"] = fds
        print(json.dumps(out))
    """)
    r = contain(capsys, backend, "proc walks/fds", program, canary, timeout_s=20.0)
    doc = _json_line(r)
    assert token not in r.stdout
    for key in ("proc1_root", "proc1_cwd", "proc1_fd", "proc1_mem", "proc1_environ"):
        assert doc[key] == errno.EACCES, (key, doc[key])  # the runner is not dumpable / not ours
    assert doc["self_cwd"] == ["main.py"]
    assert doc["data_via_root"] == errno.ENOENT
    assert doc["pids"][0] == 1 and len(doc["pids"]) == 2, doc["pids"]  # the runner and itself
    assert doc["open_fds"] == [], doc["open_fds"]


@backends
def test_ptrace_namespaces_mounts_and_kernel_interfaces_are_denied(backend, capsys, canary):
    program = textwrap.dedent("""
        import ctypes, json, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        def call(*args):
            rc = libc.syscall(*[ctypes.c_long(a) for a in args])
            return 0 if rc >= 0 else ctypes.get_errno()
        nr = json.loads(input())
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
        out = {
            "ptrace_attach_sibling": call(nr["ptrace"], 16, child, 0, 0),
            "ptrace_traceme": call(nr["ptrace"], 0, 0, 0, 0),
            "unshare_user": call(nr["unshare"], 0x10000000),
            "unshare_net": call(nr["unshare"], 0x40000000),
            "clone_newuser": call(nr["clone"], 0x10000000 | 17, 0, 0, 0, 0),
            "clone3": call(nr["clone3"], 0, 0),
            "setns": call(nr["setns"], 0, 0),
            "mount": call(nr["mount"], 0, 0, 0, 0, 0),
            "keyctl": call(nr["keyctl"], 0, -3, 0),
            "bpf": call(nr["bpf"], 0, 0, 0),
            "perf_event_open": call(nr["perf_event_open"], 0, 0, -1, -1, 0),
            "io_uring_setup": call(nr["io_uring_setup"], 1, 0),
            "process_vm_readv": call(nr["process_vm_readv"], child, 0, 0, 0, 0, 0),
        }
        import socket
        for name, args in (("raw_socket", (socket.AF_INET, socket.SOCK_RAW, 1)),
                           ("packet_socket", (17, socket.SOCK_RAW, 0))):
            try:
                socket.socket(*args).close()
                out[name] = 0
            except OSError as e:
                out[name] = e.errno
        os.kill(child, 9)
        print(json.dumps(out))
    """)
    nr = seccomp.SYSCALLS[os.uname().machine]
    r = contain(capsys, backend, "ptrace/userns/...", program, canary, timeout_s=20.0,
                stdin=json.dumps(nr))
    doc = _json_line(r)
    expected = {k: errno.EPERM for k in doc if k != "clone3"}
    assert {k: v for k, v in doc.items() if k in expected} == expected, doc
    assert doc["clone3"] == errno.ENOSYS  # so the C library falls back to clone, which is inspected


@backends
def test_memory_spread_over_many_processes_is_bounded_per_sample(backend, capsys, canary):
    # 6 processes of 96 MiB each: every one under the per-process limit of 256 MiB, together twice it
    program = textwrap.dedent("""
        import os, time
        kids = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                block = bytearray(96 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(1.0)
                os._exit(0)
            kids.append(pid)
        codes = [os.waitpid(k, 0)[1] for k in kids]
        print(sum(1 for c in codes if os.WIFSIGNALED(c)), "killed")
    """)
    r = contain(capsys, backend, "memory, 6 procs", program, canary, timeout_s=20.0, memory_mb=256)
    assert r.ok, r
    if cgroups.support().version == "none":
        pytest.skip(f"no per-sample cgroup here ({cgroups.support().reason}): rlimits bound each process only")
    assert int(r.stdout.split()[0]) >= 1 and r.oom_kills >= 1, r
    assert r.peak_memory_mb is not None and r.peak_memory_mb <= 256 + 1, r.peak_memory_mb


@backends
def test_a_10_gb_file_is_not_written(backend, capsys, canary):
    before = os.statvfs("/tmp").f_bfree
    program = textwrap.dedent("""
        import errno, os
        out = []
        for how in ("seek", "stream"):
            try:
                with open(f"/tmp/work/{how}.bin", "wb") as f:
                    if how == "seek":
                        f.seek(10 << 30)
                        f.write(b"x")
                    else:
                        chunk = b"x" * (1 << 20)
                        for _ in range(10 << 10):
                            f.write(chunk)
                out.append("written")
            except OSError as e:
                out.append(errno.errorcode[e.errno])
        print(*out)
    """)
    r = contain(capsys, backend, "10 GB file", program, canary, timeout_s=20.0)
    assert r.ok and r.stdout.split() == ["EFBIG", "EFBIG"], r
    assert os.statvfs("/tmp").f_bfree > before - (64 << 20) // os.statvfs("/tmp").f_frsize


@backends
def test_sockets_bound_inside_are_not_reachable_and_the_host_is_not_either(backend, capsys, canary):
    with socket.socket() as probe:  # a port free on the host, for the program to bind inside
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as host_server:
        host_server.bind(("127.0.0.1", 0))
        host_server.listen()
        host_port = host_server.getsockname()[1]
        program = textwrap.dedent(f"""
            import errno, socket, sys, time
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", {port}))
                s.listen()
                print("bound", flush=True)
            except OSError as e:
                print("bind", errno.errorcode[e.errno], flush=True)
            try:
                socket.create_connection(("127.0.0.1", {host_port}), timeout=2)
                print("reached the host")
            except OSError as e:
                print("host", errno.errorcode.get(e.errno, e.errno))
            time.sleep(1.5)
        """)
        attempts = []

        def connect_from_outside() -> None:
            time.sleep(0.5)
            for _ in range(5):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    attempts.append("connected")
                except OSError as e:
                    attempts.append(errno.errorcode.get(e.errno, str(e.errno)))
                time.sleep(0.1)

        outside = threading.Thread(target=connect_from_outside)
        outside.start()
        r = contain(capsys, backend, "bind/connect", program, canary, timeout_s=20.0)
        outside.join()
    lines = r.stdout.split("\n")
    assert r.ok and lines[0] == "bound" and lines[1].startswith("host E"), r
    assert "connected" not in attempts and attempts, attempts


@backends
def test_the_cases_of_one_sandbox_are_independent(backend):
    first = textwrap.dedent("""
        import os, time
        open("/tmp/work/left.txt", "w").write("state")
        open("/dev/shm/left", "w").write("state")
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            os._exit(0)
        print("case one")
    """)
    second = textwrap.dedent("""
        import os
        print(sorted(os.listdir("/tmp/work")), sorted(os.listdir("/dev/shm")),
              sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()])
    """)
    results = run_cases([(first, ""), ("while True: pass", ""), ("raise SystemExit(3)", ""),
                         (second, ""), ("print(input()[::-1])", "abc")],
                        timeout_s=1.0, memory_mb=256, backend=backend)
    one, loop, three, two, rev = results
    assert one.ok and one.stdout == "case one\n", one
    assert loop.timed_out and loop.returncode == -9 and 1.0 <= loop.seconds < 30.0, loop
    assert three.returncode == 3 and not three.timed_out
    assert two.ok and two.stdout == "['main.py'] [] True\n", two
    assert rev.ok and rev.stdout == "cba\n"


@backends
def test_one_sandbox_per_completion_scores_as_one_per_test(backend):
    from r1mega.data.synthetic import get_task

    spec = get_task("programming")
    records = spec.generate(4, seed=3, difficulty=max(spec.difficulties))
    for k, record in enumerate(records):
        completion = spec.solution(record, style="r1-zero")
        if k % 2:  # a wrong program for half of them
            completion = completion.replace("print(", "print(1 + ", 1)
        a = code_reward_details(completion, record.tests, backend=backend, timeout_s=5.0)
        b = code_reward_details(completion, record.tests, backend=backend, timeout_s=5.0,
                                sandbox_per="test")
        assert a[0] == b[0] and [t["passed"] for t in a[1]["tests"]] == [t["passed"] for t in b[1]["tests"]]
    with pytest.raises(ValueError, match="sandbox_per"):
        code_reward_details("```python\nprint(1)\n```", [{"input": "", "output": "1"}], sandbox_per="x")


# ------------------------------------------------------------------------------ the filter itself
def _kernel_header_numbers(machine: str) -> dict[str, int] | None:
    header = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
              "aarch64": "/usr/include/asm-generic/unistd.h"}[machine]
    if not os.path.exists(header):
        return None
    found = {}
    for line in Path(header).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_") and parts[2].isdigit():
            found[parts[1][5:]] = int(parts[2])
        elif len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("__NR_") \
                and parts[2].startswith("(__NR_"):  # aarch64: arch-specific offsets are not ours
            continue
    return found


@pytest.mark.parametrize("machine", sorted(seccomp.SYSCALLS))
def test_the_syscall_tables_match_the_kernel_headers(machine):
    headers = _kernel_header_numbers(machine)
    if headers is None:
        pytest.skip(f"no kernel headers for {machine} here")
    ours = seccomp.SYSCALLS[machine]
    assert {n: headers.get(n) for n in ours} == ours


def test_the_filter_in_a_process_of_its_own():
    """Outside any sandbox, as root (where every call below would succeed): the filter alone
    turns them into EPERM, while ordinary work (fork, threads, TCP sockets, files) goes on."""
    if os.geteuid() != 0 or not seccomp.supported_machine():
        pytest.skip("needs root and a known architecture")
    import subprocess
    import sys

    code = textwrap.dedent("""
        import ctypes, json, os, socket, sys, threading
        sys.path.insert(0, sys.argv[1])
        import launcher
        libc = launcher.Libc()
        libc.prctl(38, 1)  # NO_NEW_PRIVS
        libc.install_seccomp(bytes.fromhex(sys.stdin.read()))
        raw = ctypes.CDLL(None, use_errno=True)
        def err(rc):
            return 0 if rc >= 0 else ctypes.get_errno()
        out = {"unshare_uts": err(raw.unshare(0x04000000)), "unshare_user": err(raw.unshare(0x10000000))}
        for name, args in (("raw", (socket.AF_INET, socket.SOCK_RAW, 1)), ("packet", (17, socket.SOCK_RAW, 0)),
                           ("tcp", (socket.AF_INET, socket.SOCK_STREAM, 0))):
            try:
                socket.socket(*args).close(); out[name] = 0
            except OSError as e:
                out[name] = e.errno
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out["fork"] = os.WEXITSTATUS(os.waitpid(pid, 0)[1])
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        out["thread"] = 0
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", code, str(Path(sandbox.launcher.__file__).parent)],
                       input=seccomp.deny_filter().hex(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"unshare_uts": errno.EPERM, "unshare_user": errno.EPERM,
                                    "raw": errno.EPERM, "packet": errno.EPERM, "tcp": 0,
                                    "fork": 7, "thread": 0}


def test_the_log_line_names_how_samples_are_bounded(capsys, monkeypatch):
    if not sandbox.available_backends():
        pytest.skip("no sandbox backend works here")
    monkeypatch.setattr(sandbox, "_announced", set())
    backend = sandbox.require_backend()
    err = capsys.readouterr().err
    line = sandbox.limits_description()
    assert err == f"r1mega: code sandbox {backend}; {line}\n"
    sandbox.require_backend()
    assert capsys.readouterr().err == ""  # once per process
    s = cgroups.support()
    if s.version == "none":
        assert "rlimits" in line and s.reason in line
    else:
        assert f"cgroup {s.version}" in line
