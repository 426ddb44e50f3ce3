"""journald's native protocol: one datagram of KEY=value fields per record.

Pure encoding plus a small writer, so records keep their structured fields in
the journal (``journalctl MODULE=awb``) instead of being flattened into text.
See systemd's "Native Journal Protocol" document.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any, TextIO

#: Where journald listens for native-protocol datagrams.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: journald's field-name rule: upper-case letters, digits and '_', not starting with '_'
#: (leading-underscore fields are the trusted ones journald adds itself).
_FIELD_INVALID = re.compile(r"[^A-Z0-9_]")

#: syslog priorities for structlog's level names.
PRIORITIES: dict[str, int] = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}

#: structlog keys with a fixed journal name (systemd's well-known fields or ours).
_RENAMES: dict[str, str] = {
    "event": "IPAD_EVENT",
    "filename": "CODE_FILE",
    "pathname": "CODE_FILE",
    "lineno": "CODE_LINE",
    "func_name": "CODE_FUNC",
}

#: Keys consumed while building MESSAGE and PRIORITY, or that journald sets itself.
_SKIP = frozenset({"level", "timestamp", "message"})


def field_name(key: str) -> str:
    """Map a structlog key to a valid journal field name."""
    if key in _RENAMES:
        return _RENAMES[key]
    name = _FIELD_INVALID.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name


def encode_field(name: str, value: object) -> bytes:
    """Encode one field, using the length-prefixed form when the value has a newline."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def journal_message(event_dict: Mapping[str, Any], message: str, identifier: str = "ipad") -> bytes:
    """Build one native-protocol datagram from an event dict and its rendered text."""
    level = str(event_dict.get("level", "info"))
    parts = [
        encode_field("MESSAGE", message),
        encode_field("PRIORITY", PRIORITIES.get(level, 6)),
        encode_field("SYSLOG_IDENTIFIER", identifier),
    ]
    for key, value in event_dict.items():
        if key in _SKIP or value is None:
            continue
        parts.append(encode_field(field_name(key), value))
    return b"".join(parts)


def message_of(datagram: bytes) -> str:
    """The MESSAGE field of a datagram ``journal_message`` built (it always comes first)."""
    if datagram.startswith(b"MESSAGE="):
        return datagram[8 : datagram.index(b"\n")].decode("utf-8", "replace")
    if datagram.startswith(b"MESSAGE\n"):
        (size,) = struct.unpack_from("<Q", datagram, 8)
        return datagram[16 : 16 + size].decode("utf-8", "replace")
    return ""


class JournalLogger:
    """A structlog logger whose ``msg`` sends a finished datagram to journald.

    Logging never raises: while journald cannot be reached (it is being
    restarted, say), each record's MESSAGE goes to ``fallback`` (stderr, which
    under systemd is the journal's stream) instead of being lost.
    """

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: TextIO | None = None) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = fallback

    def msg(self, datagram: bytes) -> None:
        """Send; a record too large for one datagram travels in a sealed memfd."""
        try:
            try:
                self._sock.sendto(datagram, self._path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(datagram)
        except OSError:
            stream = self._fallback or sys.stderr
            print(message_of(datagram), file=stream, flush=True)

    def _send_memfd(self, datagram: bytes) -> None:
        fd = os.memfd_create("ipad-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, datagram)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, self._path)
        finally:
            os.close(fd)

    log = debug = info = warning = error = critical = exception = msg

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (``$JOURNAL_STREAM``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        stat = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (dev, ino)
