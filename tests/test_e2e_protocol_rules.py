"""docs/protocol.md's promises, checked on the wire against a real daemon with a raw client.

Ordering (the EVENT a request caused comes before its reply), request id 0
(carried out, never answered), and compatibility within the major version (a
peer of a newer minor, with fields this side does not know, and a peer of an
older one, without the optional fields).
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipad.client import BlockingClient
from ipad.protocol import wire as p
from tests.daemon_process import DaemonProcess, write_config
from tests.raw_client import Connect as RawConnect
from tests.raw_client import hello, receive

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]

ECHO = "[modules.echo]\n"


class Raw:
    """A subscribed raw connection that records every frame in the order it came."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ids = iter(range(2, 2**32))
        #: Channels granted, kept open: one closed unread would close its proxy.
        self.channels: list[int] = []

    def send(self, message: p.Message) -> int:
        """Send a request with the next id; return the id."""
        request_id = next(self.ids)
        self.sock.send(p.encode(message, request_id))
        return request_id

    def until_reply(self, request_id: int) -> tuple[list[p.Event], p.Message]:
        """The EVENTs that came before the reply to ``request_id``, and that reply."""
        events: list[p.Event] = []
        while True:
            frame = receive(self.sock)
            assert frame is not None, "the daemon closed the connection"
            self.channels.extend(frame.fds)
            if isinstance(frame.message, p.Event):
                events.append(frame.message)
            elif frame.request_id == request_id:
                return events, frame.message

    def ask(self, message: p.Message) -> tuple[list[p.Event], p.Message]:
        """Send a request and read up to its reply."""
        return self.until_reply(self.send(message))

    def close(self) -> None:
        """Close the channels granted."""
        p.close_fds(self.channels)


@pytest.fixture
def raw(raw_connect: RawConnect, start_daemon: Start, tmp_path: Path) -> Iterator[Raw]:
    """A raw client of a daemon serving echo, past HELLO and SUBSCRIBE."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    sock = raw_connect(daemon.socket)
    hello(sock)
    client = Raw(sock)
    _, subscribed = client.ask(p.Subscribe())
    assert isinstance(subscribed, p.Subscribed)
    yield client
    client.close()


def test_the_event_of_a_release_comes_before_released(raw: Raw) -> None:
    """RELEASED follows the proxy's "closed" EVENT: a client that has the reply has seen the event."""
    _, granted = raw.ask(p.RequestProxy("echo"))
    assert isinstance(granted, p.ProxyGranted), granted
    events, released = raw.ask(p.ReleaseProxy(granted.proxy_id))
    assert isinstance(released, p.Released), released
    closed = [e for e in events if e.proxy_id == granted.proxy_id and e.state == "closed"]
    assert closed, f"RELEASED came before the proxy's closed EVENT (events before it: {events})"


def test_the_event_of_proxy_ready_comes_before_proxy_state(raw: Raw) -> None:
    """PROXY_STATE follows the "valid" EVENT that PROXY_READY caused, with the same seq."""
    _, granted = raw.ask(p.RequestProxy("echo"))
    assert isinstance(granted, p.ProxyGranted), granted
    os.kill(granted.worker_pid, signal.SIGKILL)
    _, reopened = raw.ask(p.ReopenProxy(granted.proxy_id))
    assert isinstance(reopened, p.ProxyGranted), reopened
    assert reopened.state == "invalid"
    events, state = raw.ask(p.ProxyReady(granted.proxy_id, 0))
    assert isinstance(state, p.ProxyStateReply), state
    assert state.state == "valid"
    valid = [e for e in events if e.proxy_id == granted.proxy_id and e.state == "valid"]
    assert valid, f"PROXY_STATE came before the proxy's valid EVENT (events before it: {events})"
    assert valid[-1].seq == state.seq


def test_replayed_events_come_before_a_later_reply(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path
) -> None:
    """The history SUBSCRIBE(since) replays reaches the client before any reply sent after it."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    with BlockingClient(daemon.socket) as other:
        for _ in range(20):  # 40 events of history
            other.request_proxy("echo").release()
    sock = raw_connect(daemon.socket)
    hello(sock)
    # Back to back: the daemon may answer STATUS first, but once SUBSCRIBED has gone out,
    # every replayed event goes before any later reply.
    sock.send(p.encode(p.Subscribe(0), 2))
    sock.send(p.encode(p.Status(), 3))
    frames: list[p.Message] = []
    while not any(isinstance(m, p.StatusReply) for m in frames) or not any(
        isinstance(m, p.Subscribed) for m in frames
    ):
        frame = receive(sock)
        assert frame is not None
        frames.append(frame.message)
    kinds = [type(m).__name__ for m in frames]
    subscribed = next(m for m in frames if isinstance(m, p.Subscribed))
    assert subscribed.replayed >= 40
    if kinds.index("Subscribed") < kinds.index("StatusReply"):
        events = kinds[kinds.index("Subscribed") + 1 : kinds.index("StatusReply")]
        assert events == ["Event"] * subscribed.replayed, kinds
