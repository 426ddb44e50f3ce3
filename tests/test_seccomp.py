"""The seccomp filter, run two ways: by a classic-BPF interpreter for each architecture, and for real.

The interpreter runs the very bytes ``build_filter`` makes against a
``struct seccomp_data`` built here, so the aarch64 program is checked on an
x86_64 machine too; the real-process tests install the filter in a fork and
make the system calls (this machine's architecture only).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct

import pytest

from ipad.worker import seccomp as s

ARCHES = sorted(s.SYSCALLS)

#: clone(2) flags as glibc's fork() and pthread_create pass them.
FORK_FLAGS = 0x01200000 | signal.SIGCHLD  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID
THREAD_FLAGS = 0x003D0F00  # VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel would decide for this call: the filter's return value."""
    padded = [*args, 0, 0, 0, 0, 0, 0][:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(a & 0xFFFFFFFFFFFFFFFF for a in padded))
    code = s.instructions(program)
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == s._LD_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op == s._RET:
            return k
        else:
            taken = {s._JEQ: acc == k, s._JGE: acc >= k, s._JSET: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)


def decide(arch: str, name: str, *args: int, restrict: int | None = None) -> int:
    """The filter's verdict on ``name(*args)`` on ``arch``."""
    program = s.build_filter(arch, restrict_signals_to=restrict)
    return run_bpf(program, s.SYSCALLS[arch][name], s.AUDIT_ARCH[arch], args)


EPERM = s.RET_ERRNO | errno.EPERM


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(
    ("name", "args", "verdict"),
    [
        ("pidfd_send_signal", (5, signal.SIGKILL, 0, 0), EPERM),
        ("pidfd_open", (1, 0), EPERM),
        ("fcntl", (3, s.F_SETOWN, 1), EPERM),
        ("fcntl", (3, s.F_SETSIG, signal.SIGKILL), EPERM),
        ("fcntl", (3, s.F_SETOWN_EX, 0x7FFF0000), EPERM),
        ("fcntl", (3, s.F_SETFL, s.O_ASYNC | os.O_NONBLOCK), EPERM),
        ("fcntl", (3, s.F_SETFL, os.O_NONBLOCK), s.RET_ALLOW),
        ("fcntl", (3, 1, 0), s.RET_ALLOW),  # F_GETFD
        ("fcntl", (3, 1030, 3), s.RET_ALLOW),  # F_DUPFD_CLOEXEC
        ("fcntl", (3, 9), s.RET_ALLOW),  # F_GETOWN only reads
        ("ioctl", (3, s.FIOSETOWN, 0), EPERM),
        ("ioctl", (3, s.SIOCSPGRP, 0), EPERM),
        ("ioctl", (3, s.TIOCSPGRP, 0), EPERM),
        ("ioctl", (3, s.FIOASYNC, 0), EPERM),
        ("ioctl", (3, 0x5421, 0), s.RET_ALLOW),  # FIONBIO
        ("ioctl", (3, 0x541B, 0), s.RET_ALLOW),  # FIONREAD
        # The request is an unsigned int to the kernel: high bits must not hide it.
        ("ioctl", (3, (1 << 32) | s.FIOSETOWN, 0), EPERM),
        ("clone", (FORK_FLAGS, 0), s.RET_ALLOW),
        ("clone", (THREAD_FLAGS, 0), s.RET_ALLOW),
        ("clone", (0x4111, 0), s.RET_ALLOW),  # vfork's CLONE_VM | CLONE_VFORK | SIGCHLD
        ("clone", (s.CLONE_PARENT | signal.SIGCHLD, 0), s.RET_KILL_PROCESS),
        ("clone", (s.CLONE_PARENT | FORK_FLAGS, 0), s.RET_KILL_PROCESS),
        ("clone", (0x20000000 | signal.SIGCHLD, 0), s.RET_KILL_PROCESS),  # CLONE_NEWPID
        ("clone3", (0, 88), s.RET_ERRNO | errno.ENOSYS),
        # In its PID namespace a pid names only the worker's own processes.
        ("kill", (-1, signal.SIGKILL), s.RET_ALLOW),
        ("kill", (1, signal.SIGTERM), s.RET_ALLOW),
        ("tgkill", (1, 1, 0), s.RET_ALLOW),
        ("ptrace", (16, 1), s.RET_KILL_PROCESS),
        ("socket", (2, 1, 0), s.RET_ERRNO | errno.EAFNOSUPPORT),
        ("socket", (1, 5, 0), s.RET_ALLOW),
    ],
)
def test_filter_decides_each_call(
    arch: str, name: str, args: tuple[int, ...], verdict: int
) -> None:
    """Signalling calls are refused, harmless variants allowed, CLONE_PARENT kills, on each machine."""
    assert decide(arch, name, *args) == verdict


@pytest.mark.parametrize("arch", ARCHES)
def test_without_a_pid_namespace_signals_reach_only_the_worker(arch: str) -> None:
    """With restrict_signals_to: kill only to itself or its group, tkill refused, the rest to itself."""
    own = 4242
    assert decide(arch, "kill", own, 0, restrict=own) == s.RET_ALLOW
    assert decide(arch, "kill", 0, 0, restrict=own) == s.RET_ALLOW
    assert decide(arch, "kill", -own, 0, restrict=own) == s.RET_ALLOW
    for target in (-1, 1, own + 1, -(own + 1)):
        assert decide(arch, "kill", target, 9, restrict=own) == EPERM, target
    assert decide(arch, "tkill", own, 9, restrict=own) == EPERM
    assert decide(arch, "tgkill", own + 1, own + 1, 9, restrict=own) == EPERM
    assert decide(arch, "rt_sigqueueinfo", own, 9, 0, restrict=own) == s.RET_ALLOW
    assert decide(arch, "pidfd_send_signal", 3, 9, restrict=own) == EPERM


@pytest.mark.parametrize("arch", ARCHES)
def test_foreign_architecture_and_x32_are_stopped(arch: str) -> None:
    """A call made under another architecture's number kills; x86_64's x32 numbers are refused."""
    other = next(a for a in ARCHES if a != arch) if len(ARCHES) > 1 else arch
    program = s.build_filter(arch)
    if other != arch:
        assert run_bpf(program, 0, s.AUDIT_ARCH[other]) == s.RET_KILL_PROCESS
    if arch == "x86_64":
        assert run_bpf(program, s.X32_SYSCALL_BIT | 62, s.AUDIT_ARCH[arch]) == EPERM


def _in_filtered_child(body: str) -> int:
    """Fork; the child installs the filter and runs ``body``; its exit status, or -signal."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(s.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            s.install(s.build_filter(), libc.prctl)
            exec(body, {"os": os, "libc": libc, "ctypes": ctypes, "signal": signal})  # noqa: S102
        except OSError as exc:
            os._exit(100 + (exc.errno or 0) % 100)
        except BaseException:  # noqa: BLE001
            os._exit(99)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


REAL = pytest.mark.skipif(not s.supported(), reason="no filter for this architecture")
SYSCALL = {"x86_64": {"clone": 56}, "aarch64": {"clone": 220}}.get(s.machine(), {})


@REAL
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("os.pidfd_open(os.getppid())", 100 + errno.EPERM),
        ("signal.pidfd_send_signal(os.open('/proc/self', os.O_RDONLY), 0)", 100 + errno.EPERM),
        ("import fcntl\nfcntl.fcntl(0, fcntl.F_SETOWN, os.getppid())", 100 + errno.EPERM),
        ("import fcntl\nfcntl.fcntl(0, 10, 9)", 100 + errno.EPERM),  # F_SETSIG
        ("import fcntl\nfcntl.fcntl(0, fcntl.F_SETFL, os.O_ASYNC)", 100 + errno.EPERM),
        ("import fcntl\nfcntl.fcntl(0, fcntl.F_SETFL, os.O_NONBLOCK)", 0),
        ("import fcntl, struct\nfcntl.ioctl(0, 0x8901, struct.pack('i', 1))", 100 + errno.EPERM),
        ("import fcntl, struct\nfcntl.ioctl(0, 0x5452, struct.pack('i', 1))", 100 + errno.EPERM),
        # fork, a thread and posix_spawn work: glibc meets clone3's ENOSYS and falls back.
        ("pid = os.fork()\nif pid == 0: os._exit(7)\nassert os.waitpid(pid, 0)[1] >> 8 == 7", 0),
        ("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()", 0),
        ("pid = os.posix_spawn('/bin/true', ['true'], {})\nos.waitpid(pid, 0)", 0),
        (f"libc.syscall({SYSCALL.get('clone', -1)}, 0x8000 | 17, 0, 0, 0, 0)", -signal.SIGSYS),
    ],
)
def test_filter_in_a_real_process(body: str, expected: int) -> None:
    """For real: pidfd, I/O-owner and O_ASYNC calls fail with EPERM; fork works; CLONE_PARENT kills."""
    assert _in_filtered_child(body) == expected
