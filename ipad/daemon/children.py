"""The daemon's children, every one reaped in one place: the reaper.

Each worker, standby and fork server is adopted here the moment its process
exists (a spawn returned, a fork was answered), before anything else can
happen to the code that started it: cancelled, that code cannot leak it.
One epoll set (ipad/daemon/reactor.py) holds every pidfd; when one becomes
readable the process has exited and is still a zombie, so its pid -- and its
process group's id -- cannot have been reused: the group is killed (what the
worker left behind in it) and only then the zombie reaped. Nothing is ever
signalled by pid after it was reaped.

``close`` is the last word, whatever ended the daemon: every child still
there is killed with SIGKILL and reaped, within a deadline, and so is any
child the daemon never learned of (a fork whose reply died with its fork
server).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path

import structlog
import trio

from ipad.daemon.reactor import Reactor
from ipad.daemon.worker_process import WorkerProcess

log = structlog.get_logger("ipad")

#: How long ``close`` waits for SIGKILLed children: only one stuck in the kernel (D state) waits.
KILL_WAIT = 5.0


class Children:
    """Every process the daemon started and has not reaped yet."""

    def __init__(self, reactor: Reactor, *, strays: bool = False) -> None:
        self.reactor = reactor
        #: Whether every child of the main thread is ours to reap (the daemon's; not a test's).
        self.owns_strays = strays
        self._alive: dict[int, WorkerProcess] = {}  # by pid

    def __len__(self) -> int:
        return len(self._alive)

    def __contains__(self, process: WorkerProcess) -> bool:
        return self._alive.get(process.pid) is process

    def holds(self, pid: int) -> bool:
        """Whether a process of ours with this pid is held already."""
        return pid in self._alive

    def adopt(
        self, process: WorkerProcess, on_exit: Callable[[WorkerProcess], None] | None = None
    ) -> None:
        """Reap ``process`` when it exits, then call ``on_exit`` (its exit status is set)."""
        self._alive[process.pid] = process
        self.reactor.add(process.pidfd, functools.partial(self._exited, process, on_exit))

    def _exited(
        self, process: WorkerProcess, on_exit: Callable[[WorkerProcess], None] | None
    ) -> None:
        self.reactor.remove(process.pidfd)
        self._alive.pop(process.pid, None)
        process.reap()
        if on_exit is not None:
            on_exit(process)

    def adopt_pid(self, pid: int, module: str) -> WorkerProcess | None:
        """Kill and reap a child of ours that nobody holds (a fork answered too late)."""
        try:
            pidfd = child_pidfd(pid)
        except OSError:
            return None  # reaped already, or not ours to touch
        process = WorkerProcess.stray(module, pid, pidfd)
        self.adopt(process, lambda p: p.close())
        process.kill()
        return process

    def strays(self) -> list[int]:
        """Children of the daemon's main thread that nobody adopted (their replies were lost).

        Only the main thread starts workers; a sandbox trial forks from a
        worker thread and reaps its child itself, so it never shows up here.
        """
        if not self.owns_strays:
            return []
        return [pid for pid in listed_children() if pid not in self._alive]

    def reap_strays(self) -> None:
        """Adopt, kill and reap every stray child (logged)."""
        for pid in self.strays():
            if self.adopt_pid(pid, "unknown") is not None:
                log.warning("daemon.stray_child", worker_pid=pid, action="killed")

    async def close(self, timeout: float = KILL_WAIT) -> None:
        """Kill every child left and reap it, waiting at most ``timeout`` (shielded).

        Runs after the reactor stopped: each pidfd is waited on here directly.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            self.reap_strays()  # adopted and killed: reaped below with the rest
            for process in list(self._alive.values()):
                process.kill()
            for process in list(self._alive.values()):
                await trio.lowlevel.wait_readable(process.pidfd)
                self.reactor.remove(process.pidfd)
                self._alive.pop(process.pid, None)
                process.reap()
                process.close()
        for process in self._alive.values():  # stuck in the kernel: say so, leave it
            log.error("daemon.child_not_reaped", worker_pid=process.pid, module=process.module)


def listed_children() -> list[int]:
    """The children of this process's main thread, which starts every worker (from /proc)."""
    try:
        return [int(pid) for pid in
                Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()]  # fmt: skip
    except OSError:
        return []


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def is_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process (its parent in /proc/PID/stat)."""
    fields = _stat(pid)
    return fields is not None and int(fields[1]) == os.getpid()


def process_group(pid: int) -> int | None:
    """The process group of ``pid`` (from /proc/PID/stat), None if it is gone."""
    fields = _stat(pid)
    return int(fields[2]) if fields is not None else None


def child_pidfd(pid: int) -> int:
    """A pidfd for ``pid`` if it is a child of the daemon; OSError if not, or if it is gone.

    The fork server says which pid it forked. The daemon signals and reaps only
    a process that is its own child (CLONE_PARENT makes every fork one): nobody
    else can reap it, so its pid can be no other process's meanwhile, and a
    reply naming any other pid (a fork server gone wrong) touches nothing.
    """
    if pid <= 0:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
    pidfd = os.pidfd_open(pid)
    if not is_child(pid):  # checked after the pidfd: it pins the process being checked
        os.close(pidfd)
        raise ChildProcessError(errno.ECHILD, f"process {pid} is not a child of the daemon")
    return pidfd
