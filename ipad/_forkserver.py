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
import importlib
import os
import platform
import signal
import socket
import sys
from collections.abc import Iterable
from typing import TypeGuard

from . import _protocol as p
from ._fdpass import recv_packet, send_packet
from ._worker_host import CONTROL_FD, WorkerHost, die_with_parent, libc, log, method_table
from .ipa import IPAModule

#: clone(2) flag: the child's parent is our parent.
CLONE_PARENT = 0x00008000
#: clone3(2) flag: start the child in the cgroup whose directory fd is given (Linux 5.7).
CLONE_INTO_CGROUP = 0x200000000

#: clone3's syscall number: the same on every architecture (new syscalls are unified).
SYS_CLONE3 = 435


class _CloneArgs(ctypes.Structure):
    """struct clone_args, up to the cgroup field."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
            "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]  # fmt: skip


#: clone's syscall number, per architecture (it is not in Python's os module).
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120, "s390x": 120}

_api = ctypes.pythonapi


def fork_sibling(cgroup_fd: int | None = None) -> int:
    """fork(), but the child's parent is our parent. Returns 0 in the child.

    With ``cgroup_fd`` the child starts inside that cgroup (clone3 with
    CLONE_INTO_CGROUP): no migration afterwards, which on some kernels waits
    out an RCU grace period of ~10 ms. Python's own fork bookkeeping
    (PyOS_BeforeFork / AfterFork) runs around the raw syscall, as os.fork()
    does it. The fork server is single-threaded.
    """
    if cgroup_fd is not None:
        # clone3 refuses an exit signal with CLONE_PARENT: the child gets ours (SIGCHLD,
        # as the daemon spawned us), which is what the daemon's waitid expects.
        args = _CloneArgs(flags=CLONE_PARENT | CLONE_INTO_CGROUP, exit_signal=0, cgroup=cgroup_fd)
        call: tuple[object, ...] = (
            SYS_CLONE3,
            ctypes.byref(args),
            ctypes.c_size_t(ctypes.sizeof(args)),
        )
    else:
        number = SYS_CLONE.get(platform.machine())
        if number is None:
            raise OSError(f"no clone syscall number known for {platform.machine()}")
        call = (number, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    _api.PyOS_BeforeFork()
    pid = libc().syscall(*call)
    if pid == 0:
        _api.PyOS_AfterFork_Child()
        return 0
    _api.PyOS_AfterFork_Parent()
    if pid < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(pid)


def _become_worker(
    server: socket.socket, control: int, output: int, env: dict[str, str], daemon: int
) -> None:
    """In the forked child: drop the server's socket, take the new one, serve, exit.

    The worker's descriptors end up as a spawned worker's: 0 = /dev/null (the
    fork server's own), 1 and 2 = its output pipe, 3 = its control socket.
    """
    status = 1
    try:
        server.close()  # frees fd 3
        os.dup2(control, CONTROL_FD)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(control)
        os.close(output)
        os.setpgid(0, 0)  # lead a process group of its own, as a spawned worker does
        die_with_parent(daemon)
        os.environ.clear()
        os.environ.update(env)
        status = WorkerHost(socket.socket(fileno=CONTROL_FD)).serve()
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
        if isinstance(frame.message, p.Preload):
            preload(frame.message.modules)
            continue
        assert isinstance(frame.message, p.Spawn)  # noqa: S101 - decode allowed only these
        if len(frame.fds) != 2 + frame.message.cgroup:
            frame.close_fds()
            error = p.Error(
                p.ErrorCode.BAD_MESSAGE, "SPAWN needs its control socket, output pipe (and cgroup)"
            )
            send_packet(server, p.encode(error, frame.request_id))
            continue
        cgroup_fd = frame.fds[2] if frame.message.cgroup else None
        in_cgroup = cgroup_fd is not None
        try:
            try:
                pid = fork_sibling(cgroup_fd)
            except OSError:
                if cgroup_fd is None:
                    raise
                in_cgroup = False  # an older kernel: fork plainly, the daemon moves it
                pid = fork_sibling(None)
        except OSError as exc:
            frame.close_fds()
            error = p.Error(p.ErrorCode.INTERNAL, f"fork failed: {exc}")
            send_packet(server, p.encode(error, frame.request_id))
            continue
        if pid == 0:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
            _become_worker(server, frame.fds[0], frame.fds[1], dict(frame.message.env), daemon)
        frame.close_fds()
        send_packet(server, p.encode(p.Spawned(pid, in_cgroup), frame.request_id))


def preload(specs: Iterable[str]) -> None:
    """Import the modules named ``DIR:package.module`` so forks start with them loaded.

    The daemon names only modules from ipad's own install directory or the
    directories the operator trusts (``trusted_module_dirs``): code of the
    same origin and trust as the fork server. A failure is logged and left to
    the worker's own LOAD to report.
    """
    for spec in specs:
        directory, _, module = spec.rpartition(":")
        if directory not in sys.path:
            sys.path.insert(0, directory)
        try:
            loaded = importlib.import_module(module)
            for value in vars(loaded).values():
                if _defined_module_class(value, module):
                    method_table(value)
        except Exception as exc:  # noqa: BLE001 - the worker's LOAD will report it properly
            log("forkserver.preload_failed", module=module, error=repr(exc))


def _defined_module_class(value: object, module: str) -> TypeGuard[type[IPAModule]]:
    """An IPA module class defined in ``module`` (not one it merely imports)."""
    return isinstance(value, type) and issubclass(value, IPAModule) and value.__module__ == module


def main(parent: int | None) -> int:
    """Entry point of ``python -m ipad._worker_host --zygote``: serve SPAWN requests on fd 3."""
    die_with_parent(parent)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return serve(socket.socket(fileno=CONTROL_FD), parent or os.getppid())
