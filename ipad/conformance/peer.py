"""Packets over a SEQPACKET socket with a deadline on every wait, decoded leniently.

The kit judges peers that may be newer than it: a field it does not know is
ignored (the compatibility rule, docs/protocol.md), so it decodes the payload,
drops unknown keys and hands the rest to ipad's codec, which checks everything
else (header, type, fd counts, field types).
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, rights

#: fcntl(2) seals (linux/fcntl.h); Python's fcntl module lacks F_SEAL_FUTURE_WRITE.
F_SEAL_FUTURE_WRITE = 0x0010
#: The seals protocol.md asks of an input buffer (F_SEAL_WRITE serves as the write seal too).
INPUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
WRITE_SEALS = fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE


class Timeout(Exception):
    """Nothing came (or could be sent) before the deadline."""


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a time.monotonic() value), never negative."""
    return max(0.0, deadline - time.monotonic())


def wait_fd(fd: int, events: int, deadline: float) -> bool:
    """Whether ``fd`` became ready for ``events`` before ``deadline``."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(math.ceil(remaining(deadline) * 1000)))


def lenient_packet(packet: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The packet with unknown payload fields dropped, and their names."""
    if len(packet) < p.HEADER_SIZE:
        return packet, ()
    magic, version, kind, flags, nfds, request_id, length = p.HEADER.unpack_from(packet)
    cls = p.MESSAGE_CLASSES.get(kind)  # an int finds its IntEnum key
    if cls is None or magic != p.MAGIC or length != len(packet) - p.HEADER_SIZE:
        return packet, ()
    try:
        payload = msgspec.msgpack.decode(packet[p.HEADER_SIZE :])
    except (msgspec.DecodeError, RecursionError):
        return packet, ()
    if not isinstance(payload, dict):
        return packet, ()
    known = set(cls.__struct_fields__)
    unknown = tuple(str(k) for k in payload if k not in known)
    if not unknown:
        return packet, ()
    body = msgspec.msgpack.encode({k: v for k, v in payload.items() if k in known})
    header = p.HEADER.pack(magic, version, kind, flags, nfds, request_id, len(body))
    return header + body, unknown


class Endpoint:
    """One end of a connection the kit speaks on: bounded sends and receives."""

    def __init__(self, sock: socket.socket, allowed: frozenset[p.MsgType], name: str) -> None:
        self.sock = sock
        self.allowed = allowed
        self.name = name
        #: Set once a receive saw end of stream (or ECONNRESET).
        self.ended = False

    def fileno(self) -> int:
        """The socket's descriptor, for poll."""
        return self.sock.fileno()

    def send(
        self, message: p.Message, request_id: int, deadline: float, fds: Sequence[int] = ()
    ) -> None:
        """Send one message; Timeout if the peer's socket stays full until ``deadline``."""
        self.send_raw(p.encode(message, request_id, len(fds)), deadline, fds)

    def send_raw(self, packet: bytes, deadline: float, fds: Sequence[int] = ()) -> None:
        """Send bytes as one packet with ``fds``, never blocking past ``deadline``."""
        flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
        while True:
            try:
                self.sock.sendmsg([packet], rights(fds), flags)
            except BlockingIOError:
                if not wait_fd(self.fileno(), select.POLLOUT, deadline):
                    raise Timeout(f"{self.name}: could not send before the deadline") from None
            else:
                return

    def receive_raw(self, deadline: float) -> tuple[bytes, list[int]] | None:
        """One packet and its fds, None at end of stream; Timeout if none came in time."""
        if not wait_fd(self.fileno(), select.POLLIN, deadline):
            raise Timeout(f"{self.name}: nothing received before the deadline")
        try:
            received = recv_packet(self.sock)
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                raise
            # The peer closed with packets of ours unread. Linux says so before the
            # packets the peer sent last (a GOODBYE): read on, they and the end follow.
            try:
                received = recv_packet(self.sock)
            except OSError:
                received = None
        if received is None:
            self.ended = True
        return received

    def receive(self, deadline: float) -> p.Frame | None:
        """The next message, None at end of stream; ProtocolError for a broken one."""
        received = self.receive_raw(deadline)
        if received is None:
            return None
        packet, fds = received
        packet, _ = lenient_packet(packet)
        return p.decode(packet, fds, allowed=self.allowed)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()


def encode_with_extras(
    message: p.Message, request_id: int, extras: dict[str, Any], nfds: int = 0
) -> bytes:
    """A packet of ``message`` whose payload carries ``extras`` too: fields of a newer peer."""
    payload = msgspec.to_builtins(message)
    assert isinstance(payload, dict)  # noqa: S101 - every message is a Struct: a map
    payload.update(extras)
    body = msgspec.msgpack.encode(payload)
    header = p.HEADER.pack(
        p.MAGIC, p.PROTOCOL_VERSION, message.TYPE, 0, nfds, request_id, len(body)
    )
    return header + body


def sealed_memfd(data: bytes, seals: int = INPUT_SEALS, name: str = "ipad-conformance") -> int:
    """A memfd holding ``data`` with ``seals`` added; the caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        if seals:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            except OSError as exc:  # before Linux 5.1: no F_SEAL_FUTURE_WRITE
                if exc.errno != errno.EINVAL or not seals & F_SEAL_FUTURE_WRITE:
                    raise
                fcntl.fcntl(
                    fd, fcntl.F_ADD_SEALS, seals & ~F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_WRITE
                )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_buffer(fd: int) -> bytes:
    """A passed buffer read as protocol.md says: the whole file from offset 0, size by fstat."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
