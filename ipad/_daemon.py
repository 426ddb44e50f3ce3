"""The daemon's top level: own the socket, run until told to stop."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
from pathlib import Path

import structlog
import trio

from ._check import CheckedConfig
from ._paths import socket_path

log = structlog.get_logger("ipad")

#: How many connections may wait for accept(); beyond it the kernel refuses them.
LISTEN_BACKLOG = 128


class SocketInUse(RuntimeError):
    """Another process is serving on the configured socket, or the path is not ours to take."""


def bind_listener(path: Path) -> socket.socket:
    """Create the daemon's SEQPACKET listening socket at ``path``.

    A leftover file is replaced only if it is a socket nobody listens on, so a
    second daemon never steals a running one's clients and a typo in the
    configuration never deletes a regular file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        path.chmod(0o660)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("socket.stale_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"another daemon is listening on {path}")


async def run_daemon(
    checked: CheckedConfig, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM or SIGINT; ``task_status`` reports the socket once bound."""
    path = socket_path(checked.config.daemon.socket)
    listener = bind_listener(path)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            log.info(
                "daemon.started",
                socket=str(path),
                pid=os.getpid(),
                modules=sorted(checked.plans),
                config=str(checked.path),
            )
            task_status.started(path)
            async for signum in signals:
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                break
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    log.info("daemon.stopped")
