"""The daemon's listening socket: made safely, or taken from systemd and checked.

Whoever can replace the socket file can put an impostor between every client
and the daemon. So the socket goes only in a directory that nobody but root
and the daemon's own user can write, in a path no one else can rename (as
OpenSSH's StrictModes checks a user's key files), with mode 0660 and the
configured group: the socket's permissions are the first gate of access
control, ipad.config.access the second.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import structlog

from ipad.daemon.systemd import listening_socket, socket_name, take_listen_fds

log = structlog.get_logger("ipad")

#: How many connections may wait for accept(); beyond it the kernel refuses them.
LISTEN_BACKLOG = 128

#: The socket's mode: owner and group may connect, others may not.
SOCKET_MODE = 0o660

#: A directory the daemon makes for its socket: its own; with a socket group, the group's too.
PRIVATE_DIR_MODE = 0o700
GROUP_DIR_MODE = 0o750


class ListenerError(RuntimeError):
    """The daemon cannot serve on the configured socket; the message says why and what to do."""


class SocketInUse(ListenerError):
    """Another process is serving on the configured socket, or the path is not ours to take."""


class UnsafeDirectory(ListenerError):
    """Someone other than root and the daemon's user could replace the socket."""


def bind_listener(path: Path, group: int | None = None) -> socket.socket:
    """Create the daemon's SEQPACKET listening socket at ``path``, mode 0660, group ``group``.

    A missing directory is made (0700, or 0750 for ``group``); an unsafe one
    is refused with UnsafeDirectory. A leftover file is replaced only if it is
    a socket nobody listens on, so a second daemon never steals a running
    one's clients and a typo in the configuration never deletes a regular file.
    Nobody can connect before listen(), which comes after the mode and group
    are set: there is no moment at which the socket is open to anyone else.
    """
    _make_directory(path.parent, group)
    problems = directory_problems(path.parent)
    if problems:
        raise UnsafeDirectory(
            f"refusing to create the socket {path}: {'; '.join(problems)}. Use a directory "
            f"that only root or uid {os.geteuid()} can write, in a path only they can change "
            "(such as $XDG_RUNTIME_DIR/ipad, or /run/ipad for root)"
        )
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    try:
        if group is not None:
            _give_to_group(path, group)
        path.chmod(SOCKET_MODE)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)  # ours: we bound it
        raise
    return sock


def _make_directory(directory: Path, group: int | None) -> None:
    if directory.exists():
        if group is not None:
            info = directory.stat()
            reachable = info.st_mode & 0o001 or (info.st_gid == group and info.st_mode & 0o010)
            if not reachable:
                log.warning("socket.directory_closed", directory=str(directory), group=group,
                            mode=f"{stat.S_IMODE(info.st_mode):04o}",
                            reason="the socket's group cannot reach the socket")  # fmt: skip
        return
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    if group is not None:
        _give_to_group(directory, group)
        directory.chmod(GROUP_DIR_MODE)


def _give_to_group(path: Path, group: int) -> None:
    try:
        os.chown(path, -1, group)
    except PermissionError:
        raise ListenerError(
            f"cannot give {path} to group {group} (daemon.socket_group): the daemon's user "
            "must be root or a member of that group"
        ) from None


def directory_problems(directory: Path, euid: int | None = None) -> list[str]:
    """Why ``directory`` is no safe place for the socket; empty if it is one.

    Every directory from it up to ``/`` (links resolved) must belong to root
    or ``euid``. The directory itself must be writable by its owner only; one
    above it may be writable by others only with the sticky bit (as ``/tmp``),
    which stops them renaming what is not theirs.
    """
    uid = os.geteuid() if euid is None else euid
    real = directory.resolve()
    problems = []
    for each in [real, *real.parents]:
        info = each.stat()
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (0, uid):
            problems.append(f"{each} belongs to uid {info.st_uid}")
        writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (each == real or not mode & stat.S_ISVTX):
            who = "others" if mode & stat.S_IWOTH else "its group"
            problems.append(f"{each} is writable by {who} (mode {mode:04o})")
    return problems


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


def open_listener(configured: Path, group: int | None = None) -> tuple[socket.socket, Path, bool]:
    """The socket systemd passed (socket activation), else a new one at ``configured``.

    Returns the socket, the path clients reach it at, and whether it was
    inherited. An inherited socket's mode and group are its socket unit's: the
    daemon only warns when they let anyone in or its directory is unsafe.
    """
    inherited = listening_socket(take_listen_fds())
    if inherited is None:
        return bind_listener(configured, group), configured, False
    path = Path(socket_name(inherited) or configured)
    log.info("socket.activated", path=str(path), fd=inherited.fileno())
    if path != configured:
        log.warning("socket.activation_path_differs", activated=str(path),
                    configured=str(configured),
                    reason="clients of the configured path will not find the daemon")  # fmt: skip
    check_inherited(path)
    return inherited, path, True


def check_inherited(path: Path) -> None:
    """Warn about an inherited socket that anyone may connect to, or that others could replace."""
    try:
        info = path.stat()
        problems = directory_problems(path.parent)
    except OSError as exc:  # an abstract or vanished path: nothing on disk to judge
        log.debug("socket.unchecked", path=str(path), error=str(exc))
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007:
        log.warning("socket.world_accessible", path=str(path), mode=f"{mode:04o}",
                    reason="every user can connect: set SocketMode=0660 and SocketGroup= "
                    "in the socket unit")  # fmt: skip
    if problems:
        log.warning("socket.directory_unsafe", path=str(path), problems=problems)
