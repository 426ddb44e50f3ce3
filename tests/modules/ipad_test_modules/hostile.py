"""A hostile module: it tries every way it knows to signal, or outlive, what is outside its sandbox.

Each method answers with what each attempt got (``"ok"``, the errno's name,
or how a helper process ended) instead of raising, so a test sees which
attack got how far; the test proves from outside that none did harm.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipad.ipa import Buffer, IPAModule

__version__ = "1.0.0"

CLONE_PARENT = 0x00008000
CLONE_VM = 0x00000100
CLONE_VFORK = 0x00004000
F_SETSIG = 10
F_SETOWN_EX = 15
FIOSETOWN = 0x8901
SIOCSPGRP = 0x8902
FIOASYNC = 0x5452
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SYS = {
    "x86_64": {"clone": 56, "tgkill": 234, "rt_sigqueueinfo": 129, "clone3": 435},
    "aarch64": {"clone": 220, "tgkill": 131, "rt_sigqueueinfo": 138, "clone3": 435},
}[os.uname().machine]

_libc = ctypes.CDLL(None, use_errno=True)
_ERRNO = {name: code for code, name in errno.errorcode.items()}


def _outcome(action: Callable[[], object]) -> str:
    """``ok``, or the errno name an action failed with."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _syscall(*args: int) -> None:
    if _libc.syscall(*args) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _in_child(action: Callable[[], object]) -> str:
    """Run ``action`` in a forked child; how the child ended (a seccomp kill is SIGSYS)."""
    pid = os.fork()
    if pid == 0:
        result = _outcome(action)
        os._exit(0 if result == "ok" else 100 + _ERRNO.get(result, 99))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, str(code))


def _setown(pid: int) -> None:
    """Have the kernel signal ``pid`` (SIGKILL) when a pipe becomes readable."""
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, fcntl.F_SETOWN, pid)
        fcntl.fcntl(read_end, F_SETSIG, signal.SIGKILL)
        fcntl.fcntl(read_end, fcntl.F_SETFL, os.O_ASYNC)
        os.write(write_end, b"x")
    finally:
        os.close(read_end)
        os.close(write_end)


def _ioctl_owner(pid: int) -> None:
    """The same through ioctl: FIOSETOWN, then FIOASYNC on a socket pair."""
    one, two = socket.socketpair()
    try:
        fcntl.ioctl(one, FIOSETOWN, struct.pack("i", pid))
        fcntl.ioctl(one, FIOASYNC, struct.pack("i", 1))
        two.send(b"x")
    finally:
        one.close()
        two.close()


def _proc_pidfd(pid: int) -> None:
    fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def _pidfd(pid: int) -> None:
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def _clone_parent(flags: int) -> None:
    """clone(CLONE_PARENT | flags): the child would be our parent's (exits at once)."""
    pid = _libc.syscall(SYS["clone"], CLONE_PARENT | flags | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _clone3_parent() -> None:
    args = struct.pack("<11Q", CLONE_PARENT, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    buffer = ctypes.create_string_buffer(args, len(args))
    pid = _libc.syscall(SYS["clone3"], buffer, ctypes.c_size_t(64))
    if pid == 0:
        os._exit(0)
    if pid < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _attacks(pid: int) -> dict[str, str]:
    """Every way to SIGKILL ``pid``, tried in turn."""
    return {
        "kill": _outcome(lambda: os.kill(pid, signal.SIGKILL)),
        "killpg": _outcome(lambda: os.killpg(pid, signal.SIGKILL)),
        "tgkill": _outcome(lambda: _syscall(SYS["tgkill"], pid, pid, 9)),
        "sigqueue": _outcome(lambda: _syscall(SYS["rt_sigqueueinfo"], pid, 9, 0)),
        "pidfd_open": _outcome(lambda: _pidfd(pid)),
        "proc_pidfd": _outcome(lambda: _proc_pidfd(pid)),
        "setown": _outcome(lambda: _setown(pid)),
        "setown_group": _outcome(lambda: _setown(-pid)),
        "ioctl_owner": _outcome(lambda: _ioctl_owner(pid)),
    }


class Hostile(IPAModule):
    """Attacks, one method each."""

    def signal_others(self, pids: list[int]) -> dict[str, dict[str, str]]:
        """Every way to SIGKILL each of ``pids`` (host pids: the daemon's, others')."""
        return {str(pid): _attacks(pid) for pid in pids}

    def kill_everyone(self) -> str:
        """kill(-1, SIGKILL) from a child: every process it may signal (not itself)."""
        return _in_child(lambda: os.kill(-1, signal.SIGKILL))

    def passed_pidfd(self, path: str) -> str:
        """Signal through a pidfd opened on a host /proc path (as if one had been passed in)."""
        return _outcome(lambda: _proc_pidfd(int(Path(path).name)))

    def signal_fd(self, target: Buffer) -> str:
        """SIGKILL through a pidfd a client passed in, as a buffer."""
        return _outcome(lambda: signal.pidfd_send_signal(target.fd, signal.SIGKILL))

    def clone_parent(self, count: int) -> dict[str, str]:
        """Children of the daemon: clone(CLONE_PARENT), vfork-style, clone3, ``count`` times each."""
        results = {}
        for name, action in (
            ("clone", lambda: _clone_parent(0)),
            ("vfork", lambda: _clone_parent(CLONE_VM | CLONE_VFORK)),
            ("clone3", _clone3_parent),
        ):
            outcomes = {_in_child(action) for _ in range(count)}
            results[name] = ",".join(sorted(outcomes))
        results["self_clone3"] = _outcome(_clone3_parent)  # ENOSYS: no kill for clone3
        return results

    def proc_view(self) -> dict[str, Any]:
        """What /proc shows: which pids, and pid 1's name."""
        pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        return {
            "pids": pids,
            "one": Path("/proc/1/comm").read_text().strip(),
            "self": os.getpid(),
        }

    def escape(self, marker: str) -> int:
        """A grandchild that leaves the group and session, names itself ``marker``, and waits.

        It asks for no parent-death signal, makes itself a subreaper, and double-forks:
        everything a process can do to outlive the worker that started it.
        """
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                os.setpgid(0, 0)
                _libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
                _libc.prctl(PR_SET_NAME, marker.encode()[:15], 0, 0, 0)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.write(write_end, struct.pack("i", os.getpid()))
                while True:
                    time.sleep(60)
            os._exit(0)
        os.waitpid(pid, 0)
        grandchild: int = struct.unpack("i", os.read(read_end, 4))[0]
        os.close(read_end)
        os.close(write_end)
        return grandchild
