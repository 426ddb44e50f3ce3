"""Starting a worker process: posix_spawn with its control socket on fd 3, no trio needed.

Kept apart from ipad/daemon/worker_process.py (which wraps the result for trio) so the
daemon can start its fork server before it has imported trio: the fork
server's own start-up, about 100 ms of interpreter and imports, then overlaps
the daemon's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
from collections.abc import Mapping, Sequence

import attrs

from ipad.protocol.fdpass import CONTROL_FD, EXTRA_FD, sized_socketpair


@attrs.define
class StartedProcess:
    """A process just started: its pid, its pidfd and our end of its control socket."""

    pid: int
    pidfd: int
    control: socket.socket
    argv: list[str]
    #: The read end of its stdout/stderr pipe, for whoever relays its output.
    output: int | None = None
    #: Set once something (the launcher) has taken charge of it.
    taken: bool = False

    def discard(self) -> None:
        """Kill and reap it if nothing took charge of it (the daemon failed to start)."""
        if self.taken:
            return
        self.taken = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        os.close(self.pidfd)
        self.control.close()
        if self.output is not None:
            os.close(self.output)
            self.output = None


def start_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    output: int | None = None,
    extra: int | None = None,
) -> StartedProcess:
    """Start ``argv`` with its control socket on fd 3, leading a new process group.

    posix_spawn (vfork) keeps the daemon's start-up cost per worker low; every
    other descriptor of the daemon is close-on-exec. With ``output`` (the write
    end of the pipe the daemon relays) the worker has exactly: 0 = /dev/null,
    1 and 2 = that pipe, 3 = its control socket; without it, the daemon's own
    stdin, stdout and stderr. ``extra`` becomes its fd 4 (the jail's cgroup, ipad/worker/jail.py).
    """
    ours, theirs = sized_socketpair()  # READY, a fork server's replies: up to MAX_PACKET
    # dup2 onto the same number would keep close-on-exec, and a source numbered as an
    # earlier action's target would be overwritten by it: every source gets a fresh number
    # above the targets.
    sources = [_above_targets(fd) for fd in (theirs.fileno(), output, extra) if fd is not None]
    source = sources[0]
    actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_DUP2, source, CONTROL_FD)]
    if output is not None:
        actions += [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, sources[1], 1),
            (os.POSIX_SPAWN_DUP2, sources[1], 2),
        ]
    if extra is not None:
        actions.append((os.POSIX_SPAWN_DUP2, sources[-1], EXTRA_FD))
    try:
        pid = os.posix_spawn(
            argv[0],
            [*argv, "--parent-pid", str(os.getpid())],
            dict(env),
            file_actions=actions,
            setpgroup=0,
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        for fd in sources:
            os.close(fd)
        theirs.close()
    return StartedProcess(pid, os.pidfd_open(pid), ours, list(argv))


def _above_targets(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered above every descriptor the child gets."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, EXTRA_FD + 1)
