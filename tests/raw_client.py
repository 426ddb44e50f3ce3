"""A client made by hand on a bare SEQPACKET socket: for tests that break the rules on purpose."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet

Connect = Callable[[Path], socket.socket]


@pytest.fixture
def raw_connect() -> Iterator[Connect]:
    """Bare SEQPACKET connections to the daemon, with a receive timeout; closed after the test."""
    socks: list[socket.socket] = []

    def connect(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socks.append(sock)
        sock.connect(str(path))
        sock.settimeout(10)
        return sock

    yield connect
    for sock in socks:
        sock.close()


def receive(sock: socket.socket) -> p.Frame | None:
    """The next message from the daemon (None at end of stream); the caller owns its fds."""
    received = recv_packet(sock)
    return None if received is None else p.decode(*received)


def hello(sock: socket.socket) -> None:
    """Do the handshake by hand."""
    sock.send(p.encode(p.Hello((p.PROTOCOL_VERSION,), "raw"), 1))
    frame = receive(sock)
    assert frame is not None
    assert isinstance(frame.message, p.Welcome)


def goodbye_reason(sock: socket.socket) -> str:
    """Read until the daemon's GOODBYE and the end of stream; return the reason."""
    reason = None
    while (frame := receive(sock)) is not None:
        frame.close_fds()
        if isinstance(frame.message, p.Goodbye):
            reason = frame.message.reason
    assert reason is not None, "the daemon closed without saying why"
    return reason


def header(kind: int, length: int, nfds: int = 0, version: int = p.PROTOCOL_VERSION) -> bytes:
    """A hand-made header."""
    return p.HEADER.pack(p.MAGIC, version, kind, 0, nfds, 7, length)
