"""The blocking client's PROXY_READY survives a daemon connection whose buffer is full for a moment.

A socketpair stands in for the daemon: its side reads nothing until a thread
starts draining it, so the client's send buffer is full when PROXY_READY is
told. Before, ``tell`` sent with no wait at all: it gave up (TimedOut, then
swallowed) and the daemon never learnt that the proxy was valid again.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ipad.client._blocking import _Connection
from ipad.protocol import wire as p

pytestmark = pytest.mark.timeout(30)


def test_proxy_ready_waits_for_room_on_a_full_daemon_connection() -> None:
    """PROXY_READY told while the socket is full is sent once the daemon reads again."""
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    filler = p.encode(p.Status())
    ours.setblocking(False)
    queued = 0
    while True:  # fill our send buffer (and the daemon's receive queue) to the brim
        try:
            ours.send(filler)
        except BlockingIOError:
            break
        queued += 1
    ours.setblocking(True)
    conn = _Connection(ours, p.FROM_DAEMON, "daemon")
    received: list[p.Message] = []

    def drain() -> None:
        time.sleep(0.3)  # the daemon busy for a moment
        daemon.settimeout(5)
        while len(received) < queued + 1:
            received.append(p.decode(daemon.recv(p.MAX_PACKET)).message)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        conn.tell(p.ProxyReady(7, replayed=2))
    finally:
        reader.join(10)
        ours.close()
        daemon.close()
    assert received[-1] == p.ProxyReady(7, replayed=2)
    assert len(received) == queued + 1
