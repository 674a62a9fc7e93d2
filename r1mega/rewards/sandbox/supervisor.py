"""The caller's side of one sandbox: start the backend, feed it the job, read its results, and
make sure that, whatever happens, nothing of it is left when :meth:`SandboxProcess.run` returns.

The sandbox's PID 1 (the runner) is killed through a pidfd opened while its parent (the
launcher, or bwrap, which we have not reaped) still holds it, so there is no pid-reuse race;
killing PID 1 makes the kernel kill every process of its namespace.
"""

from __future__ import annotations

import json
import marshal
import os
import select
import selectors
import signal
import subprocess
import time

from r1mega.rewards.sandbox.launcher import SANDBOX_ENV

KILL_GRACE_S = 5.0
_DIAGNOSTIC_BYTES = 1 << 16  # of the launcher's / bwrap's own stdout and stderr


class SandboxProcess:
    """One sandbox run, driven from the caller.

    Pipes: `cfg` (the unshare launcher's configuration), `job` (the runner's job), `results`
    (JSON lines: the launcher's status and one line per case), `info` and `status` (bwrap's
    --info-fd and --json-status-fd). Each writer is fed without blocking, every reader bounded.
    """

    def __init__(self, deadline_s: float, max_results: int) -> None:
        self.deadline_s = deadline_s
        self.max_results = max_results
        self.cfg_r, self.cfg_w = os.pipe()
        self.job_r, self.job_w = os.pipe()
        self.results_r, self.results_w = os.pipe()
        self.info_r, self.info_w = os.pipe()
        self.status_r, self.status_w = os.pipe()
        self._pending = {self.cfg_w: memoryview(b""), self.job_w: memoryview(b"")}
        self._open_writers = {self.cfg_w, self.job_w}
        self.init_pidfd: int | None = None
        self.lines: list[dict] = []
        self.diagnostics = bytearray()
        self.timed_out = False
        self.overflowed = False

    def feed(self, *, cfg: bytes = b"", job: bytes = b"") -> None:
        """What to write to the cfg and job pipes once started (their fds go into both)."""
        self._pending = {self.cfg_w: memoryview(cfg), self.job_w: memoryview(job)}

    @property
    def child_fds(self) -> tuple[int, ...]:
        return (self.cfg_r, self.job_r, self.results_w, self.info_w, self.status_w)

    def start(self, cmd: list[str]) -> None:
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=self.child_fds, start_new_session=True, env=dict(SANDBOX_ENV),
                cwd="/", close_fds=True)
        except BaseException:
            for fd in (*self.child_fds, *self._open_writers, self.results_r, self.info_r,
                       self.status_r):
                os.close(fd)
            self._open_writers.clear()
            raise
        for fd in self.child_fds:
            os.close(fd)

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
        else:  # not started far enough to know its PID 1: kill the launcher's session
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        """Drive the run to its end (results in `lines` and `diagnostics`)."""
        try:
            self._loop()
        finally:
            self._finish()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        self._sel = sel
        for fd, data in self._pending.items():
            if len(data):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_WRITE, "write")
            else:
                self._close_writer(fd)
        bufs = {self.results_r: bytearray(), self.status_r: bytearray(), self.info_r: bytearray()}
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ, "read")
        sel.register(self.proc.stdout, selectors.EVENT_READ, "diagnostics")
        deadline = time.monotonic() + self.deadline_s
        kill_deadline: float | None = None
        received = 0
        while sel.get_map():
            now = time.monotonic()
            if kill_deadline is None and now >= deadline:
                self.timed_out = True
                self.kill()
                kill_deadline = now + KILL_GRACE_S
            if kill_deadline is not None and now >= kill_deadline:
                break  # _finish kills the launcher's whole session
            wait = (deadline if kill_deadline is None else kill_deadline) - now
            for key, _ in sel.select(timeout=max(0.0, wait)):
                if key.data == "write":
                    fd = key.fd
                    try:
                        n = os.write(fd, self._pending[fd][:1 << 16])
                    except OSError:  # the reader is gone (EPIPE): the rest is not wanted
                        n = len(self._pending[fd])
                    self._pending[fd] = self._pending[fd][n:]
                    if not len(self._pending[fd]):
                        sel.unregister(fd)
                        self._close_writer(fd)
                    continue
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                if key.data == "diagnostics":
                    self.diagnostics += data[:max(0, _DIAGNOSTIC_BYTES - len(self.diagnostics))]
                    continue
                received += len(data)
                if received > self.max_results and not self.overflowed:
                    self.overflowed = True
                    self.kill()
                    kill_deadline = time.monotonic() + KILL_GRACE_S
                    continue
                buf = bufs[key.fd]
                buf += data
                if key.fd == self.info_r:
                    self._parse_info(buf)
                elif key.fd == self.results_r:
                    self._parse_records(buf)
                else:
                    self._parse_lines(buf)

    def _finish(self) -> None:
        """Whatever happened (including an exception here): nothing of the run is left."""
        sel = getattr(self, "_sel", None)
        if sel is not None:
            sel.close()
        for fd in list(self._open_writers):
            self._close_writer(fd)
        if self.proc.poll() is None:
            self.kill()
            try:
                self.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.init_pidfd is not None:
            # The PID 1's pidfd turns readable once it, and so its whole namespace, has exited.
            if not select.select([self.init_pidfd], [], [], KILL_GRACE_S)[0]:
                try:
                    signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([self.init_pidfd], [], [], KILL_GRACE_S)
            os.close(self.init_pidfd)
            self.init_pidfd = None
        self.proc.stdout.close()
        for fd in (self.results_r, self.info_r, self.status_r):
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_writer(self, fd: int) -> None:
        if fd in self._open_writers:
            self._open_writers.discard(fd)
            os.close(fd)

    def _parse_records(self, buf: bytearray) -> None:
        """The launcher's and runner's records (see :func:`.launcher.send`)."""
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "little")
            if len(buf) < 4 + size:
                return
            try:
                doc = marshal.loads(bytes(buf[4:4 + size]))
            except (ValueError, EOFError, TypeError):
                doc = {"error": "the sandbox sent an unreadable record"}
            del buf[:4 + size]
            if not isinstance(doc, dict):
                continue
            self.lines.append(doc)
            if "init_pid" in doc:
                self._open_init(int(doc["init_pid"]))

    def _parse_lines(self, buf: bytearray) -> None:
        """bwrap's --json-status-fd: one JSON document per line; only its child-pid is wanted (the
        runner's own records say how each case ended)."""
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "child-pid" in doc:
                self._open_init(int(doc["child-pid"]))

    def _parse_info(self, buf: bytearray) -> None:
        try:
            doc = json.loads(bytes(buf))
        except ValueError:
            return
        if "child-pid" in doc:
            self._open_init(int(doc["child-pid"]))
