"""The fork server: a warm worker host that forks new ones in about a millisecond.

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
import gc
import importlib
import os
import platform
import select
import signal
import socket
import sys
from collections.abc import Iterable
from typing import TypeGuard

from ipad.ipa import IPAModule
from ipad.protocol import wire as p
from ipad.protocol.fdpass import CONTROL_FD, recv_packet, send_packet
from ipad.worker import verified_import  # noqa: F401 - imported once here, not in every signed worker
from ipad.worker.host import (
    WorkerHost,
    die_with_parent,
    libc,
    line_buffered_output,
    log,
    method_specs,
)
from ipad.worker.sandbox import CLONE_NEWUSER, SandboxError, clone_flags, close_other_fds
from ipad.worker.sandbox import apply as apply_sandbox
from ipad.worker.sandbox import warm as warm_sandbox

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


def fork_sibling(cgroup_fd: int | None = None, namespaces: int = 0) -> int:
    """fork(), but the child's parent is our parent. Returns 0 in the child.

    With ``cgroup_fd`` the child starts inside that cgroup (clone3 with
    CLONE_INTO_CGROUP): no migration afterwards, which on some kernels waits
    out an RCU grace period of ~10 ms. ``namespaces`` are CLONE_NEW* flags the
    child starts in (a sandbox's PID namespace: only a fork can enter one).
    Python's own fork bookkeeping (PyOS_BeforeFork / AfterFork) runs around
    the raw syscall, as os.fork() does it. The fork server is single-threaded.
    """
    if cgroup_fd is not None:
        # clone3 refuses an exit signal with CLONE_PARENT: the child gets ours (SIGCHLD,
        # as the daemon spawned us), which is what the daemon's waitid expects.
        flags = CLONE_PARENT | CLONE_INTO_CGROUP | namespaces
        args = _CloneArgs(flags=flags, exit_signal=0, cgroup=cgroup_fd)
        call: tuple[object, ...] = (
            SYS_CLONE3,
            ctypes.byref(args),
            ctypes.c_size_t(ctypes.sizeof(args)),
        )
    else:
        number = SYS_CLONE.get(platform.machine())
        if number is None:
            raise OSError(f"no clone syscall number known for {platform.machine()}")
        call = (number, CLONE_PARENT | namespaces | signal.SIGCHLD, 0, 0, 0, 0)
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


def fork_sibling_into(cgroup_fd: int | None, namespaces: int = 0) -> tuple[int, bool]:
    """:func:`fork_sibling` into ``cgroup_fd`` where the kernel can; the pid, and whether it could.

    A kernel without CLONE_INTO_CGROUP gets a plain clone: the daemon then
    moves the worker into its cgroup itself.
    """
    try:
        return fork_sibling(cgroup_fd, namespaces), cgroup_fd is not None
    except OSError:
        if cgroup_fd is None:
            raise
        return fork_sibling(None, namespaces), False


def _become_worker(
    server: socket.socket,
    control: int,
    output: int,
    env: dict[str, str],
    daemon: DaemonWatch,
    sandbox: p.SandboxSpec | None = None,
    outer_ids: tuple[int, int] = (0, 0),
) -> None:
    """In the forked child: drop the server's socket, take the new one, serve, exit.

    The worker's descriptors end up as a spawned worker's: 0 = /dev/null (the
    fork server's own), 1 and 2 = its output pipe, 3 = its control socket. A
    sandboxed worker confines itself here, before it reads LOAD: no module code
    has run in it yet. If that fails it answers LOAD with the reason.
    """
    status = 1
    try:
        server.close()  # frees fd 3
        os.dup2(control, CONTROL_FD)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(control)
        os.close(output)
        line_buffered_output()
        os.setpgid(0, 0)  # lead a process group of its own, as a spawned worker does
        os.environ.clear()
        os.environ.update(env)
        refused = None
        if sandbox is not None and sandbox.pid_namespace:
            # The first process of a PID namespace ignores signals it has no handler for,
            # even the daemon's SIGTERM: exit on it as a worker without a namespace would.
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if sandbox is not None:
            try:
                apply_sandbox(sandbox, outer_ids, in_user_namespace=bool(
                    clone_flags(sandbox) & CLONE_NEWUSER))  # fmt: skip
            except SandboxError as exc:
                refused = f"cannot sandbox the worker: {exc}"
                log("worker.sandbox_failed", module=sandbox.module, step=exc.step,
                    reason=exc.reason)  # fmt: skip
        # After the sandbox: a change of user clears the parent-death signal.
        daemon.stay_with()
        close_other_fds()
        host = WorkerHost(socket.socket(fileno=CONTROL_FD), refused=refused)
        status = host.serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    os._exit(128 + signum)


class DaemonWatch:
    """The fork server's parent, which every worker it forks must not outlive.

    A worker in a PID namespace of its own cannot compare getppid() with the
    daemon's pid (its parent is outside: 0), so liveness is read from a pidfd.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None

    def stay_with(self) -> None:
        """Ask for SIGKILL when the daemon dies, then make sure it has not died already."""
        die_with_parent(None)
        if self.pidfd is not None:
            if select.select([self.pidfd], [], [], 0)[0]:
                os._exit(1)
        elif os.getppid() != self.pid:
            os._exit(1)


def serve(server: socket.socket, daemon: DaemonWatch) -> int:
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
        spawn = frame.message
        if len(frame.fds) != 2 + spawn.cgroup:
            frame.close_fds()
            error = p.Error(
                p.ErrorCode.BAD_MESSAGE, "SPAWN needs its control socket, output pipe (and cgroup)"
            )
            send_packet(server, p.encode(error, frame.request_id))
            continue
        cgroup_fd = frame.fds[2] if spawn.cgroup else None
        namespaces = clone_flags(spawn.sandbox) if spawn.sandbox is not None else 0
        outer_ids = (os.getuid(), os.getgid())  # what a user namespace maps: ours, from outside
        try:
            pid, in_cgroup = fork_sibling_into(cgroup_fd, namespaces)
        except OSError as exc:
            frame.close_fds()
            error = p.Error(p.ErrorCode.INTERNAL, f"fork failed: {exc}")
            send_packet(server, p.encode(error, frame.request_id))
            continue
        if pid == 0:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
            _become_worker(server, frame.fds[0], frame.fds[1], dict(spawn.env), daemon,
                           spawn.sandbox, outer_ids)  # fmt: skip
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
                    method_specs(value)
        except Exception as exc:  # noqa: BLE001 - the worker's LOAD will report it properly
            log("forkserver.preload_failed", module=module, error=repr(exc))
    gc.freeze()


def _defined_module_class(value: object, module: str) -> TypeGuard[type[IPAModule]]:
    """An IPA module class defined in ``module`` (not one it merely imports)."""
    return isinstance(value, type) and issubclass(value, IPAModule) and value.__module__ == module


def main(parent: int | None) -> int:
    """Entry point of ``python -m ipad.worker.forkserver``: serve SPAWN requests on fd 3."""
    die_with_parent(parent)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    warm_sandbox()  # forks find the C library's functions and the seccomp filter looked up
    gc.freeze()
    return serve(socket.socket(fileno=CONTROL_FD), DaemonWatch(parent or os.getppid()))


if __name__ == "__main__":
    # SIGHUP means "reload" to the daemon; sent to the whole service (systemctl kill -s HUP
    # ipad), it must not kill the fork server, nor the workers that inherit this from it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.exit(main(None))
