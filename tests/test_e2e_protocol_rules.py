"""docs/protocol.md's promises, checked on the wire against a real daemon with a raw client.

Ordering (the EVENT a request caused comes before its reply), request id 0
(carried out, never answered), and compatibility within the major version (a
peer of a newer minor, with fields this side does not know, and a peer of an
older one, without the optional fields).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ipad.client import BlockingClient, UnsupportedVersion, make_buffer, open_client
from ipad.daemon.spawn import StartedProcess, start_process
from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet
from tests.client_drivers import Connect as ConnectClient
from tests.client_drivers import connect
from tests.daemon_process import REPO, WAIT, DaemonProcess, others_still_work, write_config
from tests.fake_daemon import NEWER_FIELDS, FakeDaemon, packet
from tests.raw_client import Connect as RawConnect
from tests.raw_client import goodbye_reason, hello, receive

pytestmark = pytest.mark.timeout(90)

__all__ = ["connect"]  # the fixture that runs a test against both clients

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


# --- both clients against a daemon of another minor ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("revision", ["newer", "older"])
def test_clients_work_with_a_daemon_of_another_minor(
    connect: ConnectClient, tmp_path: Path, revision: str
) -> None:
    """Both clients work with a newer daemon (unknown fields, kinds, states) and an older one.

    The newer one's events use a kind and a proxy state no revision defines:
    the client takes them without acting on them (the proxy is not thought
    broken, no REOPEN_PROXY is sent).
    """
    with FakeDaemon(tmp_path / "fake.sock", newer=revision == "newer") as fake:
        driver = connect(fake.path)
        welcome = driver.attr(driver.client, "welcome")
        assert welcome.minor == (p.PROTOCOL_MINOR if revision == "newer" else 0)
        proxy = driver.request_proxy("echo")
        assert driver.call(proxy, "echo", {"text": "hi"}, timeout=WAIT) == {"text": "hi"}
        assert driver.status().daemon["pid"] == os.getpid()  # after the fake's odd events
        assert driver.attr(proxy, "state") == "valid"
        assert driver.call(proxy, "echo", {"n": 2}, timeout=WAIT) == {"n": 2}
        assert fake.calls == 2
        assert p.MsgType.REOPEN_PROXY not in fake.received
        driver.release(proxy)
        driver.close()


@pytest.mark.timeout(60)
def test_stop_of_one_module_is_never_sent_to_a_daemon_that_would_stop_itself(
    tmp_path: Path,
) -> None:
    """Before minor 3, ADMIN stop ignored its module: both clients and ipadctl refuse to send it."""
    with FakeDaemon(tmp_path / "fake.sock", newer=False) as fake:
        with BlockingClient(fake.path) as client:
            for command in ("stop", "start"):
                with pytest.raises(UnsupportedVersion, match="needs minor 3") as refused:
                    client.admin(command, "echo")
                assert refused.value.details == {"minor": 0, "needed": 3}

        async def trio_admin() -> None:
            async with open_client(fake.path) as client:
                with pytest.raises(UnsupportedVersion, match="stop of one module needs minor 3"):
                    await client.admin("stop", "echo")

        trio.run(trio_admin)
        ctl = subprocess.run(
            [sys.executable, "-m", "ipad.cli.ctl", "--socket", str(fake.path), "stop", "echo"],
            capture_output=True, text=True, timeout=WAIT, check=False, cwd=REPO,
        )  # fmt: skip
        assert ctl.returncode == 1, ctl.stderr
        assert "stop of one module needs minor 3" in ctl.stderr
        assert p.MsgType.ADMIN not in fake.received


@pytest.mark.timeout(60)
def test_clients_send_minor_2_requests_only_to_peers_that_agreed_to_them(
    connect: ConnectClient, tmp_path: Path
) -> None:
    """Before minor 2 there is no DESCRIBE and no MAP_BUFFERS: the clients refuse, sending nothing.

    A minor-0 daemon (and its worker) would take either for a protocol error and
    drop the connection or the channel; the client says why instead, and both
    stay usable.
    """
    with FakeDaemon(tmp_path / "fake.sock", newer=False) as fake:
        driver = connect(fake.path)
        with pytest.raises(UnsupportedVersion, match="DESCRIBE needs minor 2") as refused:
            driver.describe("echo")
        assert refused.value.details == {"minor": 0, "needed": 2}
        proxy = driver.request_proxy("echo")
        fd = make_buffer(b"frame" * 10)
        try:
            with pytest.raises(UnsupportedVersion, match="registering buffers needs minor 2"):
                driver.map_buffers(proxy, {1: fd}, timeout=WAIT)
        finally:
            os.close(fd)
        assert driver.call(proxy, "echo", {"text": "still"}, timeout=WAIT) == {"text": "still"}
        assert driver.status().daemon["pid"] == os.getpid()
        assert p.MsgType.DESCRIBE not in fake.received
        assert fake.calls == 1  # the channel carried the one CALL, no MAP_BUFFERS
        driver.release(proxy)
        driver.close()


# --- a raw client of another minor against the real daemon and its real worker ---------


def _frame(sock: socket.socket, request_id: int, channels: list[int]) -> p.Message:
    """The reply to ``request_id``, skipping events; granted channels go to ``channels``."""
    while True:
        frame = receive(sock)
        assert frame is not None, "the daemon closed the connection"
        channels.extend(frame.fds)
        if frame.request_id == request_id and not isinstance(frame.message, p.Event):
            return frame.message


def _call(channel: int, payload: dict[str, Any], request_id: int) -> p.Message:
    """One CALL on a proxy's channel as a raw map; the worker's reply."""
    with socket.socket(fileno=os.dup(channel)) as sock:
        sock.settimeout(WAIT)
        sock.send(packet(p.MsgType.CALL, payload, request_id))
        while True:
            frame = receive(sock)
            assert frame is not None, "the worker closed the channel"
            if frame.request_id == request_id:
                return frame.message


@pytest.mark.parametrize("revision", ["newer", "older"])
def test_a_client_of_another_minor_works_with_the_real_daemon(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path, revision: str
) -> None:
    """Every client request, sent with unknown fields (newer) or without optional ones (older).

    The newer client says minor 2**64 - 1 and is answered this daemon's minor; the
    older says none and is answered 0. The daemon and the worker serve both.
    """
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    sock = raw_connect(daemon.socket)
    channels: list[int] = []

    def ask(kind: p.MsgType, fields: dict[str, Any], request_id: int) -> p.Message:
        payload = {**fields, **NEWER_FIELDS} if revision == "newer" else fields
        sock.send(packet(kind, payload, request_id))
        return _frame(sock, request_id, channels)

    try:
        hello = {"versions": [1], "client": "other", "minor": 2**64 - 1} if revision == "newer" else {
            "versions": [1]}  # fmt: skip
        welcome = ask(p.MsgType.HELLO, hello, 1)
        assert isinstance(welcome, p.Welcome), welcome
        assert welcome.minor == (p.PROTOCOL_MINOR if revision == "newer" else 0)
        assert isinstance(ask(p.MsgType.SUBSCRIBE, {}, 2), p.Subscribed)
        assert isinstance(ask(p.MsgType.STATUS, {}, 3), p.StatusReply)
        assert isinstance(ask(p.MsgType.LIST_MODULES, {}, 4), p.Modules)
        granted = ask(p.MsgType.REQUEST_PROXY, {"module": "echo"}, 5)
        assert isinstance(granted, p.ProxyGranted), granted
        assert granted.minor == p.PROTOCOL_MINOR  # what ipad's own worker host agreed
        call = {"method": "echo", "args": {"text": "hi"}}
        if revision == "newer":
            call.update(NEWER_FIELDS)
        result = _call(channels[-1], call, 1)
        assert result == p.Result({"text": "hi"}), result
        os.kill(granted.worker_pid, signal.SIGKILL)
        reopened = ask(p.MsgType.REOPEN_PROXY, {"proxy_id": granted.proxy_id}, 6)
        assert isinstance(reopened, p.ProxyGranted), reopened
        state = ask(p.MsgType.PROXY_READY, {"proxy_id": granted.proxy_id}, 7)
        assert isinstance(state, p.ProxyStateReply), state
        assert state.state == "valid"
        assert _call(channels[-1], {"method": "count"}, 2) == p.Result(1)
        done = ask(p.MsgType.ADMIN, {"command": "restart", "module": "echo"}, 8)
        assert isinstance(done, p.AdminDone), done
        released = ask(p.MsgType.RELEASE_PROXY, {"proxy_id": granted.proxy_id}, 9)
        assert released == p.Released(granted.proxy_id)
        bye = {"reason": "done", **(NEWER_FIELDS if revision == "newer" else {})}
        sock.send(packet(p.MsgType.GOODBYE, bye))
        gone = daemon.wait_for("client.disconnected", lambda r: "goodbye" in r["reason"])
        assert gone["reason"] == "client said goodbye: done"
    finally:
        p.close_fds(channels)


@pytest.fixture
def worker_host() -> Iterator[StartedProcess]:
    """A real worker host process, started as the daemon starts one (control socket on fd 3)."""
    started = start_process([sys.executable, "-m", "ipad.worker.host"], dict(os.environ))
    started.control.settimeout(WAIT)
    try:
        yield started
    finally:
        started.discard()  # killed and reaped if the test did not see it exit


def _exit_status(started: StartedProcess) -> int:
    """Wait (bounded) for the worker to exit; its status. It is reaped here."""
    ready, _, _ = select.select([started.pidfd], [], [], WAIT)
    assert ready, f"the worker did not exit within {WAIT}s"
    result = os.waitid(os.P_PIDFD, started.pidfd, os.WEXITED)
    assert result is not None
    started.taken = True
    os.close(started.pidfd)
    started.control.close()
    return result.si_status


@pytest.mark.parametrize("revision", ["newer", "older"])
def test_the_real_worker_host_serves_a_daemon_of_another_minor(
    worker_host: StartedProcess, revision: str
) -> None:
    """LOAD, OPEN_INSTANCE, PING, CALL, CLOSE_INSTANCE and SHUTDOWN with extra or missing fields.

    The newer daemon says minor 99 in LOAD and is answered the worker's minor
    in READY; the older (no minor, no heartbeat board, no signature) gets 0,
    and a worker that answers PING.
    """
    control = worker_host.control

    def send(kind: p.MsgType, fields: dict[str, Any], request_id: int = 0,
             fds: tuple[int, ...] = ()) -> None:  # fmt: skip
        payload = {**fields, **NEWER_FIELDS} if revision == "newer" else fields
        send_packet(control, packet(kind, payload, request_id, len(fds)), fds)

    def reply(request_id: int) -> p.Message:
        received = recv_packet(control)
        assert received is not None, "the worker exited"
        frame = p.decode(*received)
        assert frame.request_id == request_id, frame
        return frame.message

    load: dict[str, Any] = {"module": "echo", "entry_point": "ipa_modules.echo:Echo",
            "module_dir": str(REPO / "workers" / "modules"),
            "tuning": str(REPO / "workers" / "tuning" / "echo" / "uncalibrated.toml")}  # fmt: skip
    if revision == "newer":
        load["minor"] = 99
    send(p.MsgType.LOAD, load, 1)
    ready = reply(1)
    assert isinstance(ready, p.Ready), ready
    assert ready.minor == (p.PROTOCOL_MINOR if revision == "newer" else 0)
    assert not ready.beats
    send(p.MsgType.PING, {}, 2)
    assert reply(2) == p.Pong()
    client_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with client_end, worker_end:
        send(p.MsgType.OPEN_INSTANCE, {"instance_id": 1}, 3, (worker_end.fileno(),))
        worker_end.close()
        assert reply(3) == p.InstanceOpened(1)
        call = {"method": "echo", "args": {"text": "hi"}}
        if revision == "newer":
            call.update(NEWER_FIELDS)
        assert _call(client_end.fileno(), call, 1) == p.Result({"text": "hi"})
        send(p.MsgType.CLOSE_INSTANCE, {"instance_id": 1})
        client_end.settimeout(WAIT)
        assert receive(client_end) is None  # the instance closed its channel
    send(p.MsgType.SHUTDOWN, {})
    assert _exit_status(worker_host) == 0


def test_a_broken_control_message_makes_the_worker_exit_with_a_failure(
    worker_host: StartedProcess,
) -> None:
    """A control packet the worker cannot decode ends it with status 2, never 0.

    A clean exit (0) is not restarted under the default ``restart = "on-failure"``:
    a worker that exited 0 here would leave its module down for good.
    """
    worker_host.control.send(b"XX" + bytes(18))  # bad magic
    assert _exit_status(worker_host) == 2


# --- request id 0: carried out, never answered ----------------------------------------


def test_a_request_with_id_0_is_carried_out_and_not_answered(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path
) -> None:
    """The daemon answers no request sent with id 0, not even with an ERROR.

    A REQUEST_PROXY with id 0 makes a proxy whose channel is never sent: the
    worker sees it closed, and the daemon closes the proxy.
    """
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    sock = raw_connect(daemon.socket)
    hello(sock)
    sock.send(p.encode(p.Status(), 0))
    sock.send(p.encode(p.ReleaseProxy(999), 0))  # unknown proxy: no ERROR either
    sock.send(p.encode(p.RequestProxy("echo"), 0))
    sock.send(p.encode(p.Status(), 3))
    frame = receive(sock)
    assert frame is not None
    assert (type(frame.message), frame.request_id) == (p.StatusReply, 3), frame
    assert frame.fds == ()
    daemon.wait_for("proxy.state_changed", lambda r: r["state"] == "closed")
    sock.send(p.encode(p.Status(), 4))
    frame = receive(sock)
    assert frame is not None
    assert (type(frame.message), frame.request_id) == (p.StatusReply, 4), frame
    assert frame.message.daemon["proxies"] == 0  # type: ignore[attr-defined]


def test_a_call_with_id_0_runs_and_is_not_answered(raw: Raw) -> None:
    """A CALL with id 0 runs in the worker, which sends no RESULT or ERROR for it."""
    _, granted = raw.ask(p.RequestProxy("echo"))
    assert isinstance(granted, p.ProxyGranted), granted
    with socket.socket(fileno=os.dup(raw.channels[-1])) as channel:
        channel.settimeout(WAIT)
        channel.send(p.encode(p.Call("count"), 0))
        channel.send(p.encode(p.Call("nope"), 0))  # unknown method: no ERROR either
        channel.send(p.encode(p.Call("count"), 5))
        frame = receive(channel)
        assert frame is not None
        assert (frame.message, frame.request_id) == (p.Result(2), 5)


def test_unknown_fields_from_a_hostile_client_are_bounded(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path
) -> None:
    """Unknown fields are skipped, not trusted: a large one is dropped, an absurdly deep one refused.

    A client may fill its whole message with a field the daemon does not know
    (answered, nothing kept); one nested 10 000 deep is a protocol error for
    that client alone, and the daemon serves everyone else.
    """
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    big = raw_connect(daemon.socket)
    hello(big)
    filler = {"zz_filler": "x" * 60_000, "zz_many": list(range(500))}
    big.send(packet(p.MsgType.STATUS, filler, 2))
    frame = receive(big)
    assert frame is not None
    assert (type(frame.message), frame.request_id) == (p.StatusReply, 2)
    deep = raw_connect(daemon.socket)
    hello(deep)
    body = b"\x81\xa7zz_deep" + b"\x91" * 10_000 + b"\xc0"
    header = p.HEADER.pack(p.MAGIC, 1, p.MsgType.STATUS, 0, 0, 2, len(body))
    deep.send(header + body)
    assert goodbye_reason(deep).startswith("protocol error: bad STATUS payload")
    others_still_work(daemon)


def test_a_goodbye_sent_with_replies_unread_is_logged_with_its_reason(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path
) -> None:
    """A client that sends GOODBYE and closes with replies unread is logged with its reason.

    Linux reports such a close to the daemon as ECONNRESET before the packets the
    client sent ahead of it; the daemon reads on to the GOODBYE, as clients do.
    """
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    sock = raw_connect(daemon.socket)
    hello(sock)
    client = Raw(sock)
    _, subscribed = client.ask(p.Subscribe())
    assert isinstance(subscribed, p.Subscribed)
    client.send(p.Status())
    # The reply is in the client's socket, unread, when it says goodbye and closes.
    readable, _, _ = select.select([sock], [], [], WAIT)
    assert readable, f"no reply to STATUS within {WAIT}s"
    sock.send(p.encode(p.Goodbye("leaving")))
    sock.close()
    gone = daemon.wait_for("client.disconnected")
    assert gone["reason"] == "client said goodbye: leaving", gone


def test_reopens_of_a_proxy_on_its_live_worker_are_paced_like_restarts(
    raw_connect: RawConnect, start_daemon: Start, tmp_path: Path
) -> None:
    """A reopen whose worker still runs is answered at once; the next in a row waits its delay.

    With start_timeout and the restart delays far past the socket's 10 s timeout,
    the first grant shows the daemon did not wait for another worker; the second
    reopen is not answered until the proxy's release ends its wait.
    """
    restart = '[modules.echo.restart]\nstart_timeout = "300s"\ninitial_delay = "300s"\n'
    restart += 'max_delay = "300s"\n'
    daemon = start_daemon(write_config(tmp_path, modules=ECHO + restart))
    sock = raw_connect(daemon.socket)
    hello(sock)
    client = Raw(sock)
    try:
        _, granted = client.ask(p.RequestProxy("echo"))
        assert isinstance(granted, p.ProxyGranted), granted
        _, reopened = client.ask(p.ReopenProxy(granted.proxy_id))
        assert isinstance(reopened, p.ProxyGranted), reopened
        assert reopened.worker_pid == granted.worker_pid  # the same worker, which never ended
        paced = client.send(p.ReopenProxy(granted.proxy_id))
        readable, _, _ = select.select([sock], [], [], 1.0)
        assert not readable, "a second reopen in a row was answered without its delay"
        released = client.send(p.ReleaseProxy(granted.proxy_id))
        replies: dict[int, p.Message] = {}
        while len(replies) < 2:
            frame = receive(sock)
            assert frame is not None, "the daemon closed the connection"
            client.channels.extend(frame.fds)
            replies[frame.request_id] = frame.message
        assert replies[released] == p.Released(granted.proxy_id), replies
        error = replies[paced]
        assert isinstance(error, p.Error), error
        assert error.code == p.ErrorCode.UNKNOWN_PROXY, error
    finally:
        client.close()
