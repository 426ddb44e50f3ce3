"""The worker's seccomp filter: a small classic-BPF program of our own, no libseccomp.

Why our own: the filter is a fixed deny list, about sixty instructions, built
as bytes in pure Python and installed with one prctl(2). A binding would add a
dependency (pyseccomp, ctypes over libseccomp, has had no release since 2021;
Debian's python3-seccomp serves only the system interpreter, not a venv) and a
dlopen plus a compile in every new worker; this costs tens of microseconds and
needs nothing but the kernel. What it cannot do that libseccomp could is cover
every architecture: it knows x86_64 and aarch64, and elsewhere ``seccomp`` is
reported unavailable (docs/security.md).

The filter kills the worker for what only an escape attempt does: tracing or
reading other processes, mounting, changing or making namespaces (clone with
CLONE_NEW* flags too), kernel keyrings, BPF, perf, modules, kexec. It denies
with EPERM what a library might try and do without: clocks, host names, swap,
io_uring (whose operations would bypass this filter). It allows ``socket``
only for AF_UNIX, so no network socket can be made even where a network
namespace is not. A foreign architecture's system call kills the process.

Signals: every way to signal a process by something other than a pid the
worker's PID namespace resolves is closed. ``pidfd_open`` and
``pidfd_send_signal`` fail with EPERM (a pidfd may come from a /proc
directory or be passed in; a library such as asyncio probes pidfd_open and
falls back); ``fcntl`` F_SETOWN, F_SETOWN_EX, F_SETSIG and F_SETFL with
O_ASYNC, and ``ioctl`` FIOSETOWN, SIOCSPGRP, TIOCSPGRP and FIOASYNC (which
would have the kernel signal an owner for I/O) fail with EPERM; ``clone`` with
CLONE_PARENT (a child of the daemon, outside the namespace, left a zombie)
kills the worker, as only an escape asks for it. ``kill``, ``tkill``,
``tgkill`` and ``rt_*sigqueueinfo`` stay allowed: a pid names a process of the
caller's PID namespace, which holds only the worker's own. Without a PID
namespace of its own (``restrict_signals_to``), a worker may signal only
itself and its process group.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from collections.abc import Sequence

#: prctl(2) options and seccomp constants from <linux/seccomp.h> and <linux/filter.h>.
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# Classic BPF opcodes: load a word of seccomp_data, compare, return.
_LD_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06

#: Offsets into struct seccomp_data: nr, arch, then the arguments (low word first, LE).
_NR, _ARCH, _ARG0, _ARG1, _ARG2 = 0, 4, 16, 24, 32

#: AUDIT_ARCH_* per machine: a filter built for one is never run for another.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

#: System calls only an escape attempt makes: reaching into other processes, undoing
#: the mount view or the namespaces, the kernel's own interfaces. They kill the worker
#: (SIGSYS), and the daemon reports the crash reason ``seccomp``.
KILLED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
)  # fmt: skip

#: System calls a library may try and do without: they fail with EPERM.
DENIED = (
    "swapon", "swapoff", "acct", "quotactl", "vhangup", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

#: What the kernel would signal for, on ``fcntl`` (linux/fcntl.h, asm-generic/fcntl.h): refused.
F_SETFL = 4
F_SETOWN = 8
F_SETSIG = 10
F_SETOWN_EX = 15
O_ASYNC = 0o20000
FCNTL_SIGNALLING = (F_SETOWN, F_SETSIG, F_SETOWN_EX)
#: ioctl requests that set an I/O owner or O_ASYNC (asm-generic: the same on both machines).
FIOSETOWN = 0x8901
SIOCSPGRP = 0x8902
TIOCSPGRP = 0x5410
FIOASYNC = 0x5452
IOCTL_SIGNALLING = (FIOSETOWN, SIOCSPGRP, TIOCSPGRP, FIOASYNC)

#: System call numbers per machine (x86_64: arch/x86/entry/syscalls/syscall_64.tbl;
#: aarch64: include/uapi/asm-generic/unistd.h). Numbers from 424 up are the same on both.
_COMMON = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "mount_setattr": 442,
}  # fmt: skip
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        **_COMMON,
        "ioctl": 16, "socket": 41, "clone": 56, "kill": 62, "fcntl": 72, "ptrace": 101,
        "syslog": 103,
        "rt_sigqueueinfo": 129, "vhangup": 153, "pivot_root": 155, "adjtimex": 159,
        "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
        "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
        "setdomainname": 171, "init_module": 175, "delete_module": 176, "quotactl": 179,
        "tkill": 200, "clock_settime": 227, "tgkill": 234, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "unshare": 272, "rt_tgsigqueueinfo": 297,
        "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
        "kcmp": 312, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
        "userfaultfd": 323,
    },
    "aarch64": {
        **_COMMON,
        "fcntl": 25, "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51,
        "vhangup": 58,
        "quotactl": 60, "acct": 89, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "kill": 129,
        "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "reboot": 142,
        "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "adjtimex": 171,
        "socket": 198, "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220,
        "swapon": 224, "swapoff": 225, "rt_tgsigqueueinfo": 240, "perf_event_open": 241,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "clock_adjtime": 266,
        "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272,
        "finit_module": 273, "bpf": 280, "userfaultfd": 282, "kexec_file_load": 294,
    },
}  # fmt: skip

#: x86_64's x32 ABI sets this bit in the number; its calls would dodge the table above.
X32_SYSCALL_BIT = 0x40000000

#: clone(2) flags that make a namespace.
NAMESPACE_FLAGS = 0x7E020080  # NEWTIME|NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
#: clone(2) flag: the child's parent is the caller's parent (outside the worker's tree).
CLONE_PARENT = 0x00008000

AF_UNIX = 1


class SeccompUnavailable(Exception):
    """No filter for this machine's architecture, or the kernel refused it."""


def machine() -> str:
    """The architecture name the tables above use."""
    return platform.machine()


def supported(arch: str | None = None) -> bool:
    """Whether a filter can be built for ``arch`` (default: this machine)."""
    return (arch or machine()) in SYSCALLS


class _Program:
    """Instructions with forward jumps to named labels, resolved when assembled."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((_LD_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | int, false: str | int = 0) -> None:
        self.code.append((op, true, false, k))

    def ret(self, value: int, label: str | None = None) -> None:
        if label is not None:
            self.labels[label] = len(self.code)
        self.code.append((_RET, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for index, (op, true, false, k) in enumerate(self.code):
            jt, jf = (self._offset(index, target) for target in (true, false))
            out += struct.pack("<HBBI", op, jt, jf, k & 0xFFFFFFFF)
        return bytes(out)

    def _offset(self, index: int, target: object) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[str(target)] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"jump to {target} out of reach ({offset})")
        return offset


def build_filter(arch: str | None = None, restrict_signals_to: int | None = None) -> bytes:
    """The filter for ``arch``, as struct sock_filter bytes.

    With ``restrict_signals_to`` (the worker's own pid, as it sees it), kill and
    its relatives may only target that process or its process group.
    """
    name = arch or machine()
    if name not in SYSCALLS:
        raise SeccompUnavailable(f"no seccomp filter for architecture {name}")
    numbers = SYSCALLS[name]
    prog = _Program()
    prog.load(_ARCH)
    prog.jump(_JEQ, AUDIT_ARCH[name], 1, 0)
    prog.ret(RET_KILL_PROCESS)
    prog.load(_NR)
    if name == "x86_64":
        prog.jump(_JGE, X32_SYSCALL_BIT, "deny")
    for syscall in KILLED:
        prog.jump(_JEQ, numbers[syscall], "kill_process")
    for syscall in DENIED:
        prog.jump(_JEQ, numbers[syscall], "deny")
    prog.jump(_JEQ, numbers["clone3"], "nosys")  # its flags are out of reach: glibc falls back
    prog.jump(_JEQ, numbers["clone"], "clone")
    prog.jump(_JEQ, numbers["socket"], "socket")
    for syscall in ("pidfd_open", "pidfd_send_signal"):
        prog.jump(_JEQ, numbers[syscall], "deny")
    prog.jump(_JEQ, numbers["fcntl"], "fcntl")
    prog.jump(_JEQ, numbers["ioctl"], "ioctl")
    if restrict_signals_to is not None:
        prog.jump(_JEQ, numbers["tkill"], "deny")
        prog.jump(_JEQ, numbers["kill"], "kill")
        for syscall in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            prog.jump(_JEQ, numbers[syscall], "self")
    prog.ret(RET_ALLOW, "allow")
    prog.ret(RET_KILL_PROCESS, "kill_process")
    prog.ret(RET_ERRNO | errno.EPERM, "deny")
    prog.ret(RET_ERRNO | errno.ENOSYS, "nosys")
    # Each block below ends in returns of its own: classic BPF jumps only forward.
    prog.label("clone")
    prog.load(_ARG0)
    prog.jump(_JSET, NAMESPACE_FLAGS | CLONE_PARENT, "clone_kill", "clone_allow")
    prog.ret(RET_KILL_PROCESS, "clone_kill")
    prog.ret(RET_ALLOW, "clone_allow")
    prog.label("socket")
    prog.load(_ARG0)
    prog.jump(_JEQ, AF_UNIX, "socket_allow")
    prog.ret(RET_ERRNO | errno.EAFNOSUPPORT)
    prog.ret(RET_ALLOW, "socket_allow")
    _owner_blocks(prog)
    if restrict_signals_to is not None:
        _signal_blocks(prog, restrict_signals_to)
    return prog.assemble()


def _signal_blocks(prog: _Program, own: int) -> None:
    """Without a PID namespace: ``kill`` only to ``own`` or its group, the rest only to itself."""
    prog.label("kill")
    prog.load(_ARG0)  # the kernel takes pid_t: the low word is all it reads
    for allowed in (own, 0, -own):
        prog.jump(_JEQ, allowed & 0xFFFFFFFF, "kill_allow")
    prog.ret(RET_ERRNO | errno.EPERM)
    prog.ret(RET_ALLOW, "kill_allow")
    prog.label("self")
    prog.load(_ARG0)
    prog.jump(_JEQ, own, "self_allow")
    prog.ret(RET_ERRNO | errno.EPERM)
    prog.ret(RET_ALLOW, "self_allow")


def _owner_blocks(prog: _Program) -> None:
    """``fcntl`` and ``ioctl``: refuse what would make the kernel signal an I/O owner."""
    prog.label("fcntl")
    prog.load(_ARG1)  # the command: an unsigned int to the kernel
    for command in FCNTL_SIGNALLING:
        prog.jump(_JEQ, command, "fcntl_deny")
    prog.jump(_JEQ, F_SETFL, "fcntl_setfl", "fcntl_allow")
    prog.ret(RET_ERRNO | errno.EPERM, "fcntl_deny")
    prog.ret(RET_ALLOW, "fcntl_allow")
    prog.label("fcntl_setfl")
    prog.load(_ARG2)  # the new flags: O_ASYNC is in the low word
    prog.jump(_JSET, O_ASYNC, "setfl_deny", "setfl_allow")
    prog.ret(RET_ERRNO | errno.EPERM, "setfl_deny")
    prog.ret(RET_ALLOW, "setfl_allow")
    prog.label("ioctl")
    prog.load(_ARG1)  # the request: an unsigned int to the kernel
    for request in IOCTL_SIGNALLING:
        prog.jump(_JEQ, request, "ioctl_deny")
    prog.ret(RET_ALLOW)
    prog.ret(RET_ERRNO | errno.EPERM, "ioctl_deny")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes, prctl: object | None = None) -> None:
    """Load ``program`` as this thread's (and its children's) filter; needs no_new_privs.

    ``prctl`` is libc's, looked up by the caller once.
    """
    function = prctl if prctl is not None else ctypes.CDLL(None, use_errno=True).prctl
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    fprog_ref = ctypes.byref(fprog)
    if function(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_ref, 0, 0) != 0:  # type: ignore[operator]
        code = ctypes.get_errno()
        raise SeccompUnavailable(
            f"the kernel refused the filter: {errno.errorcode.get(code, code)}"
        )


def instructions(program: bytes) -> Sequence[tuple[int, int, int, int]]:
    """The decoded instructions (code, jt, jf, k), for tests and inspection."""
    return list(struct.iter_unpack("<HBBI", program))
