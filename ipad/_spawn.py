"""Starting a worker process: posix_spawn with its control socket on fd 3, no trio needed.

Kept apart from ipad/_worker.py (which wraps the result for trio) so the
daemon can start its fork server before it has imported trio: the fork
server's own start-up, about 100 ms of interpreter and imports, then overlaps
the daemon's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Mapping, Sequence

import attrs

#: The control socket's descriptor number in the worker (see ipad/_worker_host.py).
CONTROL_FD = 3


@attrs.define
class StartedProcess:
    """A process just started: its pid, its pidfd and our end of its control socket."""

    pid: int
    pidfd: int
    control: socket.socket
    argv: list[str]
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


def start_process(argv: Sequence[str], env: Mapping[str, str]) -> StartedProcess:
    """Start ``argv`` with its control socket on fd 3, leading a new process group.

    posix_spawn (vfork) keeps the daemon's start-up cost per worker low; every
    other descriptor of the daemon is close-on-exec, so the worker inherits
    only stdin, stdout, stderr and its control socket.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # dup2 onto the same number would keep close-on-exec: start from a fresh number.
    source = os.dup(theirs.fileno())
    try:
        pid = os.posix_spawn(
            argv[0],
            [*argv, "--parent-pid", str(os.getpid())],
            dict(env),
            file_actions=[(os.POSIX_SPAWN_DUP2, source, CONTROL_FD)],
            setpgroup=0,
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE),
        )
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(source)
        theirs.close()
    return StartedProcess(pid, os.pidfd_open(pid), ours, list(argv))
