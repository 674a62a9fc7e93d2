"""Per-sample cgroups for the sandbox: one memory and process-count budget for a whole sample.

rlimits bound each process (a sample of ``max_procs`` processes could hold ``max_procs x
memory_mb``); a cgroup bounds the sample. :func:`support` finds where this process may create
cgroups with the memory and pids controllers:

* **cgroup v2**: under ``R1MEGA_SANDBOX_CGROUP`` (a directory delegated to us, e.g. systemd's
  ``Delegate=yes``) or else under this process's own cgroup, with ``+memory +pids`` enabled in
  its ``cgroup.subtree_control`` (the kernel refuses that while the cgroup itself holds
  processes, unless it is the root: then delegate one);
* **cgroup v1**: the memory and pids hierarchies, under this process's cgroup in each;
* **none**: the sandbox falls back to rlimits only; :func:`describe` says why, in one line for
  the run's log.

A :class:`SampleCgroup` is created by the caller (it needs write access there: root, or the
delegation), joined by the sandbox's launcher before it unshares (so every process of the
sample is in it), read for the peak memory and OOM kills, and removed once the sample is gone.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
from dataclasses import dataclass

ENV_PARENT = "R1MEGA_SANDBOX_CGROUP"
_counter = itertools.count()
_lock = threading.Lock()


@dataclass(frozen=True)
class Support:
    """Where sample cgroups go: version "v2", "v1" or "none"; `parents` maps controller
    ("memory", "pids"; "" for the unified v2 tree) to the parent directory; `reason` says why
    not when "none"."""

    version: str
    parents: tuple[tuple[str, str], ...] = ()
    reason: str = ""


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, options) of each cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields and rfields[0] in ("cgroup", "cgroup2"):
                opts = set(rfields[2].split(",")) if len(rfields) > 2 else set()
                found.append((fields[3], fields[4].replace("\\040", " "), rfields[0], opts))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and "" -> its v2 path."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in (controllers.split(",") if controllers else [""]):
                paths[c] = path
    return paths


def _under(mount_root: str, mount_point: str, path: str) -> str:
    rel = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return os.path.join(mount_point, rel.lstrip("/"))


def _try_parent(parents: dict[str, str]) -> str | None:
    """None when a child cgroup can be made and removed under every parent, else why not."""
    made = []
    try:
        for c, parent in parents.items():
            probe = os.path.join(parent, f"r1mega-probe-{os.getpid()}")
            os.mkdir(probe)
            made.append(probe)
            needed = {"": ("memory.max", "pids.max"), "memory": ("memory.limit_in_bytes",),
                      "pids": ("pids.max",)}[c]
            missing = [n for n in needed if not os.path.exists(os.path.join(probe, n))]
            if missing:
                return f"{probe}: no {', '.join(missing)}"
        return None
    except OSError as e:
        return f"{e.filename or 'cgroup'}: {e.strerror}"
    finally:
        for probe in reversed(made):
            try:
                os.rmdir(probe)
            except OSError:
                pass


def _v2_parent(mounts, own) -> tuple[str | None, str]:
    unified = [m for m in mounts if m[2] == "cgroup2"]
    if not unified:
        return None, "no cgroup v2 mount"
    parent = os.environ.get(ENV_PARENT)
    if not parent:
        root, point, _, _ = unified[0]
        parent = _under(root, point, own.get("", "/"))
    try:
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError as e:
        return None, f"{parent}: {e.strerror}"
    if not {"memory", "pids"} <= available:
        return None, f"{parent}: controllers {' '.join(sorted(available)) or 'none'} (memory, pids needed)"
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        if not {"memory", "pids"} <= enabled:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+memory +pids")
    except OSError as e:
        return None, (f"{parent}: cannot enable memory and pids for children ({e.strerror}); "
                      f"delegate an empty cgroup in ${ENV_PARENT}")
    return parent, ""


@functools.lru_cache(maxsize=1)
def support() -> Support:
    """Where this process can make sample cgroups (cached; see the module docstring)."""
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError as e:
        return Support("none", reason=f"cannot read this process's cgroups: {e}")
    v2, why_v2 = _v2_parent(mounts, own)
    if v2 is not None:
        why = _try_parent({"": v2})
        if why is None:
            return Support("v2", (("", v2),))
        why_v2 = why
    v1 = {}
    for c in ("memory", "pids"):
        m = [x for x in mounts if x[2] == "cgroup" and c in x[3]]
        if m and c in own:
            v1[c] = _under(m[0][0], m[0][1], own[c])
    if len(v1) == 2:
        why = _try_parent(v1)
        if why is None:
            return Support("v1", tuple(sorted(v1.items())))
        why_v1 = why
    else:
        why_v1 = "no memory and pids hierarchies"
    return Support("none", reason=f"cgroup v2: {why_v2}; cgroup v1: {why_v1}")


def describe() -> str:
    """One line for a run's log: how the sandbox bounds a sample's memory and processes."""
    s = support()
    if s.version == "none":
        return ("sandbox limits: memory and process count per process (rlimits) only, no "
                f"per-sample cgroup ({s.reason})")
    where = ", ".join(p for _, p in s.parents)
    return f"sandbox limits: per-sample cgroup {s.version} memory and pids limits under {where}"


class SampleCgroup:
    """The cgroup(s) of one sample: memory (swap included) and process count for all of it."""

    def __init__(self, memory_bytes: int, max_procs: int) -> None:
        s = support()
        if s.version == "none":
            raise RuntimeError(s.reason)
        self.version = s.version
        with _lock:
            name = f"r1mega-{os.getpid()}-{next(_counter)}"
        self.dirs: dict[str, str] = {}
        try:
            for c, parent in s.parents:
                d = os.path.join(parent, name)
                os.mkdir(d)
                self.dirs[c] = d
            if self.version == "v2":
                d = self.dirs[""]
                self._write(d, "memory.max", memory_bytes)
                self._write(d, "memory.swap.max", 0, optional=True)
                self._write(d, "pids.max", max_procs)
            else:
                d = self.dirs["memory"]
                self._write(d, "memory.limit_in_bytes", memory_bytes)
                self._write(d, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                self._write(self.dirs["pids"], "pids.max", max_procs)
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _write(d: str, name: str, value: int, optional: bool = False) -> None:
        try:
            with open(os.path.join(d, name), "w") as f:
                f.write(str(value))
        except OSError:
            if not optional:
                raise

    @staticmethod
    def _read(d: str, name: str) -> str | None:
        try:
            with open(os.path.join(d, name)) as f:
                return f.read()
        except OSError:
            return None

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def peak_memory_bytes(self) -> int | None:
        d = self.dirs.get("" if self.version == "v2" else "memory")
        text = self._read(d, "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes")
        return int(text) if text and text.strip().isdigit() else None

    def oom_kills(self) -> int:
        d = self.dirs.get("" if self.version == "v2" else "memory")
        text = self._read(d, "memory.events" if self.version == "v2" else "memory.oom_control") or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the cgroup(s); anything still in them is killed first (it should all be gone)."""
        for d in self.dirs.values():
            for attempt in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self._kill_members(d)
                    time.sleep(0.02)
        self.dirs = {}

    def _kill_members(self, d: str) -> None:
        if os.path.exists(os.path.join(d, "cgroup.kill")):  # v2, Linux >= 5.14
            self._write(d, "cgroup.kill", 1, optional=True)
            return
        for pid in (self._read(d, "cgroup.procs") or "").split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
