"""Connecting while the daemon's listen backlog is full: wait and connect, never a false success."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
import trio

from ipad.client import BlockingClient, open_client
from ipad.client._trio import connect_unix
from ipad.protocol import wire as p
from ipad.transport.seqpacket import PacketSocket

pytestmark = pytest.mark.timeout(30)


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connections that nobody accepts, until the listener's backlog has no room left."""
    waiting: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return waiting
        waiting.append(sock)


async def test_connect_waits_for_room_in_the_backlog(tmp_path: Path) -> None:
    """Linux says EAGAIN for a full Unix backlog: connect_unix retries until there is room."""
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(1)
        waiting = fill_backlog(path)
        conn = PacketSocket(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET), p.FROM_DAEMON)
        connected = trio.Event()

        async def connect() -> None:
            await connect_unix(conn, str(path))
            connected.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await trio.sleep(0.05)
            assert not connected.is_set()  # still no room: still trying
            accepted = [listener.accept()[0]]  # one place frees up
            with trio.fail_after(10):
                await connected.wait()
        conn.raw.send(b"really connected")
        listener.setblocking(False)
        while True:
            try:
                accepted.append(listener.accept()[0])
            except BlockingIOError:
                break
        received = []
        for sock in accepted:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                received.append(sock.recv(64))
        assert received == [b"really connected"]
        for sock in [*accepted, *waiting]:
            sock.close()
        conn.close()


async def test_no_daemon_is_an_error_naming_the_socket(tmp_path: Path) -> None:
    """Both clients fail to connect with the OSError itself, naming the socket, not a group."""
    missing = tmp_path / "none.sock"
    with pytest.raises(FileNotFoundError) as trio_error:
        async with open_client(missing):
            pass
    assert trio_error.value.filename == str(missing)
    with pytest.raises(FileNotFoundError) as blocking_error:
        BlockingClient(missing)
    assert blocking_error.value.filename == str(missing)
