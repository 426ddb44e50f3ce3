"""systemd's service protocols: readiness notification (sd_notify) and socket activation.

Each is a little environment parsing and, for notification, one datagram per
message (systemd's sd_notify(3) and sd_listen_fds(3)). They live here, with no
trio import, instead of in a binding of libsystemd: see docs/operations.md for
why. The variables are taken out of the environment as they are read, as
libsystemd does with ``unset_environment``, so no worker ever inherits them.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import attrs

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

#: The variables of socket activation, of notification and of the watchdog.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARIABLE = "NOTIFY_SOCKET"
WATCHDOG_VARIABLES = ("WATCHDOG_PID", "WATCHDOG_USEC")


class ActivationError(Exception):
    """systemd passed descriptors the daemon cannot serve on; the message says which and why."""


@attrs.frozen
class ListenFd:
    """One descriptor passed by socket activation and its FileDescriptorName=."""

    fd: int
    name: str


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The descriptors ``LISTEN_FDS`` passes to process ``pid``; none if they are not for it.

    A ``LISTEN_PID`` naming another process means the variables were inherited
    from a parent they were meant for: they are ignored, as sd_listen_fds does.
    """
    if "LISTEN_PID" not in environ:
        return []
    try:
        listen_pid = int(environ["LISTEN_PID"])
    except ValueError:
        raise ActivationError(f"LISTEN_PID={environ['LISTEN_PID']!r} is not a process id") from None
    if listen_pid != pid:
        return []
    raw = environ.get("LISTEN_FDS", "")
    try:
        count = int(raw)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={raw!r} is not a number of descriptors") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={raw!r} is not a number of descriptors")
    names = environ.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in environ else []
    if names and len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES names {len(names)} descriptors but LISTEN_FDS says {count}"
        )
    names = names or ["unknown"] * count
    return [ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def take_listen_fds(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[ListenFd]:
    """The descriptors systemd passed us, made close-on-exec, with the variables unset."""
    env = os.environ if environ is None else environ
    try:
        fds = parse_listen_fds(env, os.getpid() if pid is None else pid)
    finally:
        for name in LISTEN_VARIABLES:
            env.pop(name, None)
    for passed in fds:
        try:
            os.set_inheritable(passed.fd, False)
        except OSError as exc:
            raise ActivationError(
                f"fd {passed.fd} ({passed.name}) from LISTEN_FDS is not open: {exc.strerror}"
            ) from None
    return fds


def listening_socket(fds: list[ListenFd]) -> socket.socket | None:
    """The one SEQPACKET listening socket systemd passed, checked; None without activation.

    Anything else (more sockets, a stream socket, a socket nobody listens on)
    is an ActivationError saying what the socket unit should say instead.
    """
    if not fds:
        return None
    if len(fds) != 1:
        names = ", ".join(f"fd {f.fd} ({f.name})" for f in fds)
        raise ActivationError(
            f"systemd passed {len(fds)} descriptors ({names}); ipad serves on exactly one "
            "socket: give the socket unit a single ListenSequentialPacket="
        )
    passed = fds[0]
    what = f"fd {passed.fd} ({passed.name}) from LISTEN_FDS"
    try:
        sock = socket.socket(fileno=passed.fd)
    except OSError as exc:
        raise ActivationError(f"{what} is not a socket: {exc.strerror}") from None
    try:
        problem = _socket_problem(sock)
    except OSError as exc:
        problem = f"cannot be inspected: {exc.strerror}"
    if problem is not None:
        sock.detach()  # leave the descriptor to its owner; we exit with the error
        raise ActivationError(f"{what} {problem}")
    return sock


def _socket_problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX:
        return f"is an {sock.family.name} socket, not AF_UNIX: use ListenSequentialPacket=PATH"
    if sock.type != socket.SOCK_SEQPACKET:
        return f"is a {sock.type.name} socket, not SOCK_SEQPACKET: use ListenSequentialPacket="
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening (is Accept=yes set in the socket unit? ipad needs Accept=no)"
    return None


def socket_name(sock: socket.socket) -> str:
    """The path a Unix socket is bound to ('' for an unnamed or abstract one)."""
    name = sock.getsockname()
    return name if isinstance(name, str) else ""


# --- notification ---------------------------------------------------------------


def notify_message(fields: Mapping[str, object]) -> bytes:
    """One sd_notify datagram: ``KEY=value`` lines; a newline in a value becomes a space."""
    lines = []
    for key, value in fields.items():
        if not key or not key.isupper() or "=" in key:
            raise ValueError(f"{key!r} is not a notification variable name")
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode("utf-8", "replace")


def notify_address(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or '@' for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # not a Unix socket this daemon knows how to reach (e.g. vsock)


def describe_error(exc: OSError) -> str:
    """``ENOENT: No such file or directory``: the errno's name and its text."""
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, for RELOADING=1's MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The socket sd_notify messages go to; without ``$NOTIFY_SOCKET`` there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names; the variable is taken out of the environment."""
        env = os.environ if environ is None else environ
        value = env.pop(NOTIFY_VARIABLE, "")
        return cls(notify_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._sock is not None

    def send(self, message: bytes) -> bool:
        """Send one message without blocking; False without a manager.

        OSError as sendto raises it: BlockingIOError while the manager's queue
        is full (a busy PID 1; net.unix.max_dgram_qlen may be as low as 10),
        for the caller to retry, as libsystemd's blocking send would wait.
        """
        if self._sock is None or self.address is None:
            return False
        self._sock.sendto(message, self.address)
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def take_watchdog_usec(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> int | None:
    """The watchdog interval systemd expects pings within, in µs; None if there is none for us.

    As sd_watchdog_enabled: ``WATCHDOG_PID``, when set, must be this process.
    The variables are taken out of the environment.
    """
    env = os.environ if environ is None else environ
    raw_pid = env.pop("WATCHDOG_PID", None)
    raw_usec = env.pop("WATCHDOG_USEC", None)
    if raw_usec is None:
        return None
    if raw_pid is not None and raw_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    return usec if usec > 0 else None
