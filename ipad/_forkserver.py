"""The fork server (zygote): a warm worker host that forks new ones in about a millisecond.

Starting Python and importing the worker runtime costs tens of milliseconds;
forking a process that has done so already costs about one. The daemon starts
one fork server; each SPAWN brings a control socket and an environment, and
the server forks a worker host to serve it.

The fork uses clone(CLONE_PARENT): the new worker is a child of the *daemon*,
not of the fork server, so the daemon reaps it and reads its exit status
through its pidfd exactly as for a worker it spawned itself. The fork server
never imports module code: one module's import-time code must not run in the
process every other module is forked from.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import sys

from . import _protocol as p
from ._fdpass import recv_packet, send_packet
from ._worker_host import CONTROL_FD, WorkerHost, die_with_parent, log

#: clone(2) flag: the child's parent is our parent.
CLONE_PARENT = 0x00008000

#: clone's syscall number, per architecture (it is not in Python's os module).
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120, "s390x": 120}

_libc = ctypes.CDLL(None, use_errno=True)
_api = ctypes.pythonapi


def fork_sibling() -> int:
    """fork(), but the child's parent is our parent. Returns 0 in the child.

    Python's own fork bookkeeping (PyOS_BeforeFork / AfterFork) runs around the
    raw syscall, as os.fork() does it. The fork server is single-threaded.
    """
    number = SYS_CLONE.get(platform.machine())
    if number is None:
        raise OSError(f"no clone syscall number known for {platform.machine()}")
    _api.PyOS_BeforeFork()
    pid = _libc.syscall(number, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        _api.PyOS_AfterFork_Child()
        return 0
    _api.PyOS_AfterFork_Parent()
    if pid < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(pid)


def _become_worker(server: socket.socket, fd: int, env: dict[str, str], daemon: int) -> None:
    """In the forked child: drop the server's socket, take the new one, serve, exit."""
    status = 1
    try:
        server.close()
        os.setpgid(0, 0)  # lead a process group of its own, as a spawned worker does
        die_with_parent(daemon)
        os.environ.clear()
        os.environ.update(env)
        status = WorkerHost(socket.socket(fileno=fd)).serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(server: socket.socket, daemon: int) -> int:
    """Fork a worker for every SPAWN until the daemon says SHUTDOWN or goes away."""
    while True:
        try:
            received = recv_packet(server)
            if received is None:
                return 0
            frame = p.decode(*received, allowed=p.TO_FORKSERVER)
        except p.ProtocolError as exc:
            log("forkserver.protocol_error", reason=exc.reason)
            return 1
        if isinstance(frame.message, p.Shutdown):
            return 0
        assert isinstance(frame.message, p.Spawn)  # noqa: S101 - decode allowed only these
        if len(frame.fds) != 1:
            frame.close_fds()
            error = p.Error(p.ErrorCode.BAD_MESSAGE, "SPAWN needs exactly one fd")
            send_packet(server, p.encode(error, frame.request_id))
            continue
        try:
            pid = fork_sibling()
        except OSError as exc:
            frame.close_fds()
            error = p.Error(p.ErrorCode.INTERNAL, f"fork failed: {exc}")
            send_packet(server, p.encode(error, frame.request_id))
            continue
        if pid == 0:
            _become_worker(server, frame.fds[0], dict(frame.message.env), daemon)
        frame.close_fds()
        send_packet(server, p.encode(p.Spawned(pid), frame.request_id))


def main(parent: int | None) -> int:
    """Entry point of ``ipad-worker --zygote``: serve SPAWN requests on fd 3."""
    die_with_parent(parent)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return serve(socket.socket(fileno=CONTROL_FD), parent or os.getppid())
