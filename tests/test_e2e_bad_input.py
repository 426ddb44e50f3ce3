"""Bad input against a live daemon: one connection closed with a reason, everyone else served."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipad.client import BlockingClient
from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet
from tests.daemon_process import (
    TEST_MODULES,
    DaemonProcess,
    open_fds,
    wait_until,
    write_config,
)
from tests.raw_client import Connect, goodbye_reason, header, hello

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., DaemonProcess]


@pytest.fixture
def served(start_daemon: Start) -> Iterator[tuple[DaemonProcess, BlockingClient, object]]:
    """A daemon and a well-behaved client holding a proxy, to show they are unharmed."""
    daemon = start_daemon()
    with BlockingClient(daemon.socket) as good:
        proxy = good.request_proxy("echo")
        proxy.call("count")
        yield daemon, good, proxy


def assert_unharmed(good: BlockingClient, proxy: object) -> None:
    """The well-behaved client's proxy kept its state and the daemon answers it."""
    assert proxy.call("count") == 2  # type: ignore[attr-defined]
    assert good.status().daemon["proxies"] == 1


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"garbage", "protocol error: packet of 7 bytes is shorter than the header"),
        (b"XX" + b"\0" * 30, "protocol error: bad magic"),
        (header(200, 0), "protocol error: unknown message type 200"),
        (header(p.MsgType.STATUS, 0, version=9), "protocol error: unsupported protocol version 9"),
        (header(p.MsgType.STATUS, 5), "protocol error: payload length 5 does not match"),
        (header(p.MsgType.READY, 1) + b"\x80", "protocol error: unexpected message READY"),
        (header(p.MsgType.REQUEST_PROXY, 1) + b"\xc1", "protocol error: bad REQUEST_PROXY payload"),
        (b"", "client closed the connection"),
    ],
)
def test_malformed_frames_close_only_that_connection(
    served: tuple[DaemonProcess, BlockingClient, object],
    packet: bytes,
    reason: str,
    raw_connect: Connect,
) -> None:
    """Each malformed frame ends that connection with its reason; other clients see nothing."""
    daemon, good, proxy = served
    bad = raw_connect(daemon.socket)
    hello(bad)
    bad.send(packet)
    if packet:
        assert goodbye_reason(bad).startswith(reason)
    else:
        assert recv_packet(bad) is None
    bad.close()
    record = daemon.wait_for("client.disconnected", lambda r: r["reason"].startswith(reason))
    assert record["peer_pid"] == os.getpid()
    assert_unharmed(good, proxy)


def test_oversized_frame(
    served: tuple[DaemonProcess, BlockingClient, object], raw_connect: Connect
) -> None:
    """A packet larger than the maximum is refused without reading it whole."""
    daemon, good, proxy = served
    bad = raw_connect(daemon.socket)
    bad.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * p.MAX_PACKET)
    hello(bad)
    bad.send(header(p.MsgType.STATUS, p.MAX_PACKET) + b"\0" * p.MAX_PACKET)
    assert goodbye_reason(bad).startswith("protocol error: packet larger than")
    assert_unharmed(good, proxy)


def test_too_many_fds(
    served: tuple[DaemonProcess, BlockingClient, object], raw_connect: Connect
) -> None:
    """More fds than allowed ends the connection, and the daemon keeps none of them."""
    daemon, good, proxy = served
    daemon.wait_standbys()  # standbys and their spare instances open fds in the background
    good.status()  # let the daemon finish closing what the fixture's requests used
    before = open_fds(daemon.proc.pid)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(p.MAX_FDS + 4)]
    try:
        bad = raw_connect(daemon.socket)
        hello(bad)
        packet = header(p.MsgType.STATUS, 0, nfds=len(fds))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        bad.sendmsg([packet], rights)
        assert goodbye_reason(bad).startswith("protocol error: more than 16 file descriptors")
        bad.close()
    finally:
        for fd in fds:
            os.close(fd)
    daemon.wait_for("client.disconnected", lambda r: "more than 16" in r["reason"])
    # The count settles as the session's last closes run; a leak would never get back.
    wait_until(lambda: open_fds(daemon.proc.pid) == before, timeout=5)
    assert_unharmed(good, proxy)


def test_fds_on_a_message_that_takes_none(
    served: tuple[DaemonProcess, BlockingClient, object],
    raw_connect: Connect,
) -> None:
    """An fd sent with STATUS is a protocol error, and the daemon closes it."""
    daemon, good, proxy = served
    read_end, write_end = os.pipe()
    bad = raw_connect(daemon.socket)
    hello(bad)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end]).tobytes())]
    payload = p.encode(p.Status())[p.HEADER_SIZE :]
    bad.sendmsg([header(p.MsgType.STATUS, len(payload), nfds=1) + payload], rights)
    assert "cannot carry 1 file descriptor" in goodbye_reason(bad)
    os.close(write_end)
    # Every copy of the write end is closed (ours and the daemon's): the pipe reads EOF.
    assert os.read(read_end, 1) == b""
    os.close(read_end)
    assert_unharmed(good, proxy)


def test_hello_twice_and_requests_before_hello(start_daemon: Start, raw_connect: Connect) -> None:
    """The handshake comes first and once."""
    daemon = start_daemon()
    first = raw_connect(daemon.socket)
    first.send(p.encode(p.Status(), 1))
    assert goodbye_reason(first) == "expected HELLO, got STATUS"
    second = raw_connect(daemon.socket)
    hello(second)
    second.send(p.encode(p.Hello((1,)), 2))
    assert goodbye_reason(second) == "HELLO sent twice"


def test_unsupported_version(start_daemon: Start, raw_connect: Connect) -> None:
    """A client speaking only other versions gets a typed error naming the supported ones."""
    daemon = start_daemon()
    sock = raw_connect(daemon.socket)
    sock.send(p.encode(p.Hello((99, 100), "future"), 1))
    received = recv_packet(sock)
    assert received is not None
    error = p.decode(*received).message
    assert isinstance(error, p.Error)
    assert error.code == "unsupported_version"
    assert error.details == {"supported": [p.PROTOCOL_VERSION]}
    assert goodbye_reason(sock) == "unsupported protocol version"


def test_bad_frame_on_a_proxy_channel(served: tuple[DaemonProcess, BlockingClient, object]) -> None:
    """Garbage on one proxy's channel closes that channel only; the worker serves the others."""
    daemon, good, proxy = served
    with BlockingClient(daemon.socket) as other:
        victim = other.request_proxy("echo")
        channel = victim._conn.sock  # reach the raw channel on purpose
        channel.send(b"not a frame at all, but long enough")
        received = recv_packet(channel)
        assert received is not None
        error = p.decode(*received).message
        assert isinstance(error, p.Error)
        assert error.code == "bad_message"
        assert recv_packet(channel) is None  # the worker closed this channel
        # ...and told the daemon, which no longer counts the proxy as open.
        record = daemon.wait_for(
            "proxy.state_changed",
            lambda r: r["proxy_id"] == victim.proxy_id and r["state"] == "closed",
        )
        assert record["reason"].startswith("protocol error: bad magic")
    daemon.wait_for("client.disconnected", lambda r: r["client_id"] == 2)
    assert_unharmed(good, proxy)


def test_module_that_fails_to_load(start_daemon: Start, tmp_path: Path) -> None:
    """A module whose import fails is retried with backoff, then cools down; the rest is served."""
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules="[modules.broken]\n[modules.echo]\n",
    )
    daemon = start_daemon(config)
    record = daemon.wait_for("module.cooldown", lambda r: r["module"] == "broken")
    assert "needs a library that is not installed" in record["reason"]
    assert "exit status 3" in record["reason"]
    assert len(daemon.events("worker.start_failed")) == 6  # max_failures (5), then one more
    with BlockingClient(daemon.socket) as client:
        broken = client.status().modules["broken"]
        assert broken["state"] == "cooldown"
        assert broken["reason"].endswith("; 6 failures within 1min")
        with pytest.raises(Exception, match="broken is unavailable") as info:
            client.request_proxy("broken")
        assert type(info.value).__name__ == "ModuleUnavailable"
        assert client.request_proxy("echo").call("echo", {"text": "ok"}) == {"text": "ok"}


def test_module_that_is_not_ready_in_time(start_daemon: Start, tmp_path: Path) -> None:
    """A worker that does not say READY within start_timeout is killed and marked failed."""
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules='[modules.slow]\n[modules.slow.restart]\nstart_timeout = "500ms"\n[modules.echo]\n',
    )
    daemon = start_daemon(config)
    record = daemon.wait_for("worker.start_failed", lambda r: r["module"] == "slow")
    assert record["reason"] == "not ready within 500ms"
    assert record["signal"] == "SIGTERM"
    exited = daemon.wait_for(
        "module.state_changed", lambda r: r["module"] == "slow" and r["state"] == "exited"
    )
    assert exited["reason"] == "failed to start: not ready within 500ms (signal SIGTERM)"
    with BlockingClient(daemon.socket) as client:
        assert client.status().modules["slow"]["state"] != "running"
        assert client.status().modules["echo"]["state"] == "running"


def test_a_start_ended_by_restart_or_stop_is_no_failure(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Restarting or stopping a module whose worker is still loading logs no start failure."""
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules='[modules.slow]\n[modules.slow.restart]\nstart_timeout = "3s"\n'
        'stop_timeout = "200ms"\n[modules.echo]\n',
    )
    daemon = start_daemon(config)  # after the first start timed out: a real failure
    assert len(daemon.events("worker.start_failed")) == 1
    first = daemon.events("worker.forked")
    loading = daemon.wait_for(
        "worker.forked", lambda r: r["module"] == "slow" and r not in first
    )  # the second start, loading
    daemon.ctl("--timeout", "0.3", "restart", "slow", check=False)  # answers once running: never
    exited = daemon.wait_for("worker.exited", lambda r: r["worker_pid"] == loading["worker_pid"])
    assert (exited["ready"], exited["signal"]) == (False, "SIGTERM")
    state = daemon.wait_for("module.state_changed", lambda r: r["module"] == "slow"
                            and r.get("worker_pid") == loading["worker_pid"]
                            and r["state"] == "exited")  # fmt: skip
    assert state["reason"] == "module slow restarting before its worker was ready (signal SIGTERM)"
    failed = [r["worker_pid"] for r in daemon.events("worker.start_failed")]
    assert loading["worker_pid"] not in failed  # (the next one may time out: slow never loads)


def test_bad_tuning_file_fails_the_start(start_daemon: Start, tmp_path: Path) -> None:
    """A tuning file the module rejects fails the worker's start with the module's message."""
    config = write_config(tmp_path, modules='[modules.awb]\ntuning = "badtuning.toml"\n')
    daemon = start_daemon(config)
    record = daemon.wait_for("worker.start_failed", lambda r: r["module"] == "awb")
    assert "unknown tuning key 'sped' (did you mean 'speed'?)" in record["reason"]
    with BlockingClient(daemon.socket) as client:
        assert client.status().modules["awb"]["state"] != "running"
