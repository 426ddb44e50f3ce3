"""Every [clients] limit against a real daemon: the client past it is told why, the others carry on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.client import BlockingClient, LimitExceeded, UnsupportedVersion
from ipad.client import _blocking as blocking_module
from ipad.protocol import wire as p
from tests.daemon_process import REPO, WAIT, DaemonProcess, open_fds, wait_until, write_config
from tests.privileges import NOBODY, as_user, needs_setpriv
from tests.raw_client import Connect, goodbye_reason, header, hello, receive

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]


def limited(start_daemon: Start, directory: Path, clients: str, extra: str = "",
            env: dict[str, str] | None = None) -> DaemonProcess:  # fmt: skip
    """A daemon running echo with these [clients] settings."""
    config = write_config(directory, f"{extra}\n[clients]\n{clients}", modules="[modules.echo]\n")
    return start_daemon(config, env=env)


def settled_fds(daemon: DaemonProcess, client: BlockingClient) -> int:
    """The daemon's descriptor count once its background work (standbys, spares) is done."""
    daemon.wait_standbys()
    client.status()
    return open_fds(daemon.proc.pid)


def test_a_connection_flood_past_the_limit(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect
) -> None:
    """Past max_connections each new connection is told why and closed; those served carry on."""
    daemon = limited(start_daemon, tmp_path, "max_connections = 8\nmax_connections_per_user = 100")
    with BlockingClient(daemon.socket) as good:
        proxy = good.request_proxy("echo")
        baseline = settled_fds(daemon, good)
        served = [raw_connect(daemon.socket) for _ in range(7)]
        for sock in served:
            hello(sock)
        flood = [raw_connect(daemon.socket) for _ in range(40)]
        reasons = {goodbye_reason(sock) for sock in flood}
        assert reasons == {
            "too many connections: the daemon serves 8 at once (clients.max_connections)"
        }
        assert proxy.call("count") == 1
        status = good.status().daemon
        assert (status["clients"], status["clients_refused"]) == (8, 40)
        refused = daemon.events("client.refused")
        assert 1 <= len(refused) <= 10  # the first ten, the rest only counted
        assert refused[0]["peer_pid"] == os.getpid()
        for sock in [*served, *flood]:
            sock.close()
        wait_until(lambda: good.status().daemon["clients"] == 1)
        metrics = daemon.ctl("metrics").stdout  # counted by reason (ipad/daemon/metrics.py)
        assert 'ipad_refusals_total{reason="max_connections"} 40\n' in metrics
        with BlockingClient(daemon.socket) as again:  # served again once others have left
            assert again.status().daemon["clients"] == 2
        wait_until(lambda: open_fds(daemon.proc.pid) == baseline, timeout=10)
        assert proxy.call("count") == 2


@needs_setpriv
def test_one_user_cannot_take_every_connection(
    start_daemon: Start, shared_dir: Path, daemon_env: dict[str, str], raw_connect: Connect
) -> None:
    """A user at max_connections_per_user is refused; another user still gets in."""
    env = {**daemon_env, "IPAD_SOCKET": str(shared_dir / "run" / "ipad.sock")}
    daemon = limited(start_daemon, shared_dir, "max_connections_per_user = 4",
                     '[daemon]\nsocket_group = "nogroup"', env=env)  # fmt: skip
    mine = [raw_connect(daemon.socket) for _ in range(4)]
    for sock in mine:
        hello(sock)
    assert goodbye_reason(raw_connect(daemon.socket)) == (
        "too many connections from uid 0: 4 at once per user (clients.max_connections_per_user)"
    )
    nogroup = daemon.socket.stat().st_gid
    result = subprocess.run(
        [*as_user(NOBODY, nogroup, []), sys.executable, "-m", "ipad.cli.ctl", "--json",
         "--socket", str(daemon.socket), "call", "echo", "echo", '{"text": "still in"}'],
        capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"text": "still in"}


def test_a_silent_connection_is_dropped(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect
) -> None:
    """No HELLO within hello_timeout: GOODBYE with the reason, then the end; after HELLO, idle is fine."""
    daemon = limited(start_daemon, tmp_path, 'hello_timeout = "300ms"')
    idle = raw_connect(daemon.socket)
    hello(idle)
    silent = raw_connect(daemon.socket)
    started = time.monotonic()
    assert goodbye_reason(silent) == "no HELLO within 300ms (clients.hello_timeout)"
    assert 0.25 <= time.monotonic() - started < WAIT
    record = daemon.wait_for("client.disconnected", lambda r: "no HELLO" in r["reason"])
    assert record["peer_pid"] == os.getpid()
    time.sleep(0.5)  # longer than the HELLO deadline: a client that said HELLO may idle
    idle.send(p.encode(p.Status(), 2))
    frame = receive(idle)
    assert frame is not None
    assert isinstance(frame.message, p.StatusReply)


@pytest.mark.parametrize("since", [None, 0], ids=["live", "with-history"])
def test_a_slow_reader_is_cut_off_without_holding_up_anyone(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect, since: int | None
) -> None:
    """A subscriber that reads nothing is disconnected once event_queue events wait for it.

    Also when it asked for the history first (256 events, which its socket still takes).
    """
    daemon = limited(start_daemon, tmp_path, "event_queue = 16")
    slow = raw_connect(daemon.socket)
    hello(slow)
    with BlockingClient(daemon.socket) as busy, BlockingClient(daemon.socket) as bystander:
        if since is not None:
            for _ in range(150):  # 300 events: the history is full (256)
                busy.request_proxy("echo").release()
        slow.send(p.encode(p.Subscribe(since), 2))  # and then never read
        cycles = 0
        # Each request and release is two events; the slow reader's socket takes about a
        # hundred before the daemon has to queue them, then 16 more and it is cut off.
        while not daemon.events("events.subscriber_overflow"):
            assert cycles < 2000, "the slow reader was never cut off"
            busy.request_proxy("echo").release()
            cycles += 1
            started = time.monotonic()
            bystander.status()
            assert time.monotonic() - started < 5  # nobody waits on the slow reader
        cut = daemon.wait_for("client.dropped", lambda r: "event queue overflow" in r["reason"])
        assert cut["reason"] == (
            "event queue overflow: the client does not read its events (16 unread, "
            "clients.event_queue)"
        )
        # It reads what its socket held, then a GOODBYE if there was room for one, then the end.
        seen = []
        while (frame := receive(slow)) is not None:
            seen.append(frame.message)
        assert isinstance(seen[0], p.Subscribed)
        assert all(isinstance(m, p.Event) for m in seen[1:-1])
        if isinstance(seen[-1], p.Goodbye):
            assert seen[-1].reason == cut["reason"]
        gone = daemon.wait_for("client.disconnected", lambda r: r["client_id"] == cut["client_id"])
        assert gone["reason"] == cut["reason"]
        assert busy.request_proxy("echo").call("count") == 1
        assert bystander.status().daemon["clients"] == 2
        # Counted: the 16 it left unread and the one that did not fit, and the cut-off.
        metrics = daemon.ctl("metrics").stdout
        assert "ipad_event_subscribers_cut_off_total 1\n" in metrics
        assert "ipad_events_dropped_total 17\n" in metrics


def test_requests_in_flight_past_the_limit(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect
) -> None:
    """While max_pending_requests are being answered, one more gets limit_exceeded at once."""
    daemon = limited(start_daemon, tmp_path, "max_pending_requests = 3\nmax_proxies_per_client = 2",
                     '[restart]\ninitial_delay = "2s"\nmax_delay = "2s"')  # fmt: skip
    sock = raw_connect(daemon.socket)
    hello(sock)
    sock.send(p.encode(p.RequestProxy("echo"), 2))
    granted = receive(sock)
    assert granted is not None
    assert isinstance(granted.message, p.ProxyGranted)
    proxy_id = granted.message.proxy_id
    # The first REOPEN_PROXY of a proxy whose worker still runs is answered at once; more
    # in a row wait as restarts would (initial_delay): three of them keep three in flight.
    sock.send(p.encode(p.ReopenProxy(proxy_id), 9))
    reopened = receive(sock)
    assert reopened is not None
    assert (reopened.request_id, type(reopened.message)) == (9, p.ProxyGranted)
    for request_id in (10, 11, 12):
        sock.send(p.encode(p.ReopenProxy(proxy_id), request_id))
    sock.send(p.encode(p.Status(), 13))
    first = receive(sock)
    assert first is not None
    assert first.request_id == 13
    assert first.message == p.Error(
        "limit_exceeded",
        "3 requests of this connection are being answered, the most "
        "clients.max_pending_requests allows (3)",
        {"limit": "max_pending_requests", "value": 3},
    )
    answered: set[int] = set()
    while len(answered) < 3:
        frame = receive(sock)
        assert frame is not None
        frame.close_fds()
        answered.add(frame.request_id)
    assert answered == {10, 11, 12}
    sock.send(p.encode(p.Status(), 14))
    again = receive(sock)
    assert again is not None
    assert (again.request_id, type(again.message)) == (14, p.StatusReply)
    granted.close_fds()
    reopened.close_fds()
    assert daemon.events("client.limit_exceeded")[0]["limit"] == "max_pending_requests"


def test_proxies_per_client(start_daemon: Start, tmp_path: Path) -> None:
    """A connection holding max_proxies_per_client proxies is refused one more, until it releases one."""
    daemon = limited(start_daemon, tmp_path, "max_proxies_per_client = 2")
    with BlockingClient(daemon.socket) as client, BlockingClient(daemon.socket) as other:
        first = client.request_proxy("echo")
        client.request_proxy("echo")
        with pytest.raises(LimitExceeded) as info:
            client.request_proxy("echo")
        assert info.value.message == (
            "this connection holds as many proxies as clients.max_proxies_per_client allows (2)"
        )
        assert info.value.details == {"limit": "max_proxies_per_client", "value": 2}
        assert other.request_proxy("echo").call("count") == 1  # a limit per connection
        first.release()
        assert client.request_proxy("echo").call("count") == 1


def test_a_message_past_max_message_size(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect
) -> None:
    """A message larger than max_message_size is never read whole: the connection ends, saying so."""
    daemon = limited(start_daemon, tmp_path, "max_message_size = 1024")
    with BlockingClient(daemon.socket) as good:
        sock = raw_connect(daemon.socket)
        hello(sock)
        sock.send(header(p.MsgType.STATUS, 2000) + b"\0" * 2000)
        assert goodbye_reason(sock) == "protocol error: packet larger than 1044 bytes"
        assert good.request_proxy("echo").call("echo", {"text": "x" * 900}) == {"text": "x" * 900}


def test_a_client_of_an_unsupported_version(
    start_daemon: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client library speaking only another version gets UnsupportedVersion, saying which."""
    daemon = limited(start_daemon, tmp_path, "")
    monkeypatch.setattr(blocking_module, "CLIENT_VERSIONS", (7,))
    with pytest.raises(UnsupportedVersion) as info:
        BlockingClient(daemon.socket)
    assert info.value.message == "this daemon speaks protocol version 1 only"
    assert info.value.details == {"supported": [1]}


def test_a_client_that_reads_nothing_does_not_hold_up_the_stop(
    start_daemon: Start, tmp_path: Path, raw_connect: Connect
) -> None:
    """Requests sent and their replies never read: SIGTERM still stops the daemon promptly."""
    daemon = limited(start_daemon, tmp_path, "")
    sock = raw_connect(daemon.socket)
    hello(sock)
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + WAIT
    # Until the daemon's replies fill our socket (its send buffer holds two largest packets,
    # some 230 STATUS replies) and it stops reading: then our requests pile up past the limit.
    while not daemon.events("client.limit_exceeded") and time.monotonic() < deadline:
        try:
            sock.send(p.encode(p.Status(), sent + 2))
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    assert sent > 100
    daemon.wait_for("client.limit_exceeded")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 15
    assert isinstance(socket.socket, type)
