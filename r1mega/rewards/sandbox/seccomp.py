"""The sandbox's seccomp filter: a classic-BPF program denying what untrusted programs never need.

:func:`deny_filter` returns the filter as the bytes of a ``struct sock_filter`` array (what
``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ...)`` and ``bwrap --seccomp FD`` take); the
sandbox's runner installs it in every program process after NO_NEW_PRIVS, just before the
program starts. Standard library only: the launcher side never imports torch or r1mega.

Denied with EPERM: debugging other processes (ptrace, process_vm_readv/writev, kcmp,
pidfd_getfd), mounts and root changes (mount, umount2, pivot_root, chroot, the new mount API,
open_tree), the kernel keyring (add_key, request_key, keyctl), bpf, perf_event_open,
userfaultfd, io_uring (it bypasses seccomp), namespaces (unshare, setns, and clone with any
CLONE_NEW* flag), raw sockets (AF_PACKET, SOCK_RAW), file handles (name_to_handle_at,
open_by_handle_at), modules, kexec, reboot, swap, clocks, hostnames, quotas, acct, syslog,
ioperm/iopl, fanotify, personality. clone3 gets ENOSYS so that the C library falls back to
clone, whose flags a classic-BPF filter can inspect (clone3 passes them in memory). A system
call made through another architecture's ABI (32-bit ``int 0x80`` on x86-64) kills the process;
x32 calls get EPERM. Everything else is allowed: the filter narrows the kernel's attack surface,
the namespaces and limits do the containment.
"""

from __future__ import annotations

import errno
import os
import struct

# <linux/audit.h> AUDIT_ARCH_* and the syscall numbers of the two architectures we run on; the
# tests check every number against the installed kernel headers.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "socket": 41, "clone": 56, "ptrace": 101, "syslog": 103, "uselib": 134,
        "personality": 135, "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "chroot": 161,
        "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
        "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
        "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179,
        "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298,
        "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
        "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435, "pidfd_getfd": 438,
        "mount_setattr": 442,
    },
    "aarch64": {  # the generic table (asm-generic/unistd.h); no iopl/ioperm/uselib/... there
        "socket": 198, "clone": 220, "ptrace": 117, "syslog": 116, "personality": 92,
        "vhangup": 58, "pivot_root": 41, "adjtimex": 171, "chroot": 51, "acct": 89,
        "settimeofday": 170, "mount": 40, "umount2": 39, "swapon": 224, "swapoff": 225,
        "reboot": 142, "sethostname": 161, "setdomainname": 162, "init_module": 105,
        "delete_module": 106, "quotactl": 60, "lookup_dcookie": 18, "clock_settime": 112,
        "kexec_load": 104, "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
        "perf_event_open": 241, "fanotify_init": 262, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "clock_adjtime": 266, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
        "kexec_file_load": 294, "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "pidfd_getfd": 438, "mount_setattr": 442,
    },
}
# Inspected by argument rather than denied outright.
_BY_ARGUMENT = ("clone", "clone3", "socket")
DENIED = tuple(sorted(n for n in SYSCALLS["x86_64"] if n not in _BY_ARGUMENT))
"""The system calls denied outright (EPERM) on x86-64; aarch64 lacks a few of them."""

CLONE_NAMESPACE_FLAGS = (0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
                         | 0x10000000 | 0x20000000 | 0x40000000)  # NEWTIME NS CGROUP UTS IPC USER PID NET
AF_PACKET, SOCK_RAW, SOCK_TYPE_MASK = 17, 3, 0xF
_X32_SYSCALL_BIT = 0x40000000

# classic BPF opcodes and seccomp return values (<linux/filter.h>, <linux/seccomp.h>)
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _AND_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_NR, _ARCH = 0, 4  # offsetof(struct seccomp_data, nr / arch)


def _arg_low(i: int) -> int:
    """Offset of the low 32 bits of syscall argument i (little-endian on both architectures)."""
    return 16 + 8 * i


def supported_machine(machine: str | None = None) -> bool:
    return (machine or os.uname().machine) in SYSCALLS


def deny_filter(machine: str | None = None) -> bytes:
    """The filter for `machine` (default: this one's ``uname -m``) as raw sock_filter bytes.

    ValueError for an architecture without a syscall table here (the sandbox then runs without
    a filter and says so)."""
    machine = machine or os.uname().machine
    if machine not in SYSCALLS:
        raise ValueError(f"no seccomp syscall table for architecture {machine!r}")
    nr = SYSCALLS[machine]
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        prog += [(_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_RET_K, 0, 0, eperm)]
    for name in DENIED:
        if name in nr:
            prog += [(_JEQ_K, 0, 1, nr[name]), (_RET_K, 0, 0, eperm)]
    prog += [(_JEQ_K, 0, 1, nr["clone3"]), (_RET_K, 0, 0, enosys)]
    prog += [
        (_JEQ_K, 0, 4, nr["clone"]),
        (_LD_W_ABS, 0, 0, _arg_low(0)),            # flags
        (_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS),
        (_RET_K, 0, 0, eperm),
        (_RET_K, 0, 0, _RET_ALLOW),
        (_JEQ_K, 0, 7, nr["socket"]),
        (_LD_W_ABS, 0, 0, _arg_low(0)),            # domain
        (_JEQ_K, 3, 0, AF_PACKET),
        (_LD_W_ABS, 0, 0, _arg_low(1)),            # type (| SOCK_NONBLOCK | SOCK_CLOEXEC)
        (_AND_K, 0, 0, SOCK_TYPE_MASK),
        (_JEQ_K, 0, 1, SOCK_RAW),
        (_RET_K, 0, 0, eperm),
        (_RET_K, 0, 0, _RET_ALLOW),
        (_RET_K, 0, 0, _RET_ALLOW),                # any other system call
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)
