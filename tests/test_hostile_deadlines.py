"""Deadlines everywhere a worker can stall: hostile modules against a real daemon.

The ``stuck`` module (tests/modules/ipad_test_modules/stuck.py) attacks its
own worker's liveness from inside: it beats the heartbeat board from a
thread while its call blocks the loop, trickles events to stretch a call,
stops reading its control socket or its channel, answers OPEN_INSTANCE
late, and writes garbage on its control socket. Each test proves from the
outside that the attack failed (the call has its deadline, the worker is
replaced, the daemon keeps no state for it) and that the daemon, another
module and ``ipadctl status`` carry on; the daemon fixture stops every
daemon with SIGTERM and fails the test unless it exits cleanly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.config.loader import parse_config
from ipad.config.problems import ConfigError
from ipad.daemon.heartbeat import Heartbeats
from ipad.daemon.worker_process import WorkerProcess
from ipad.protocol import wire as p
from ipad.transport.seqpacket import PacketSocket
from ipad.worker.heartbeat_board import Beater, new_board
from tests.client_drivers import BlockingDriver, Driver, TrioDriver
from tests.daemon_process import (
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    fd_targets,
    of_module,
    open_fds,
    others_still_work,
    wait_until,
    write_config,
)
from tests.raw_client import hello, receive

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]

#: The heartbeat's pace in these tests: a hang is seen within about a fifth of a second.
INTERVAL = 0.2
#: Slack for a loaded two-core machine on top of what a deadline promises.
SLACK = 3.0

CONFIG = """
[daemon]
module_dirs = ["{modules}"]

[restart]
heartbeat_interval = "{interval}s"
[modules.echo]

[modules.stuck]
[modules.stuck.restart]
heartbeat_timeout = "{heartbeat_timeout}s"
call_timeout = "{call_timeout}s"
start_timeout = "{start_timeout}s"
standby = {standby}
"""


def stuck_daemon(
    start_daemon: Start,
    directory: Path,
    *,
    call_timeout: float = 1.0,
    heartbeat_timeout: float = 1.0,
    start_timeout: float = 5.0,
    standby: bool = True,
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    """A daemon running ``stuck`` (with these limits) next to the shipped ``echo``.

    A call blocks its worker's loop, so its beats too: a legitimate call longer
    than ``heartbeat_timeout`` is a hang as well. The tests of long calls raise it.
    """
    text = CONFIG.format(modules=TEST_MODULES, interval=INTERVAL, call_timeout=call_timeout,
                         heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout,
                         standby=str(standby).lower())  # fmt: skip
    return start_daemon(write_config(directory, modules=text), env=env)


def driver(kind: str, path: Path) -> Driver:
    """The client of that kind, connected to ``path``."""
    return TrioDriver(path) if kind == "trio" else BlockingDriver(path)


def calls_answer_on_a_new_worker(client: Driver, proxy: Any, old_pid: int) -> None:
    """The proxy recovers onto a worker other than ``old_pid`` and its calls answer there."""
    assert client.call(proxy, "ping", wait=WAIT, timeout=WAIT) == "pong"
    assert client.call(proxy, "pid", timeout=WAIT) != old_pid


@pytest.mark.parametrize("kind", ["trio", "blocking"])
def test_a_beating_thread_cannot_hide_a_blocked_call(
    start_daemon: Start, tmp_path: Path, kind: str
) -> None:
    """A call past call_timeout times out by default, and the daemon kills the worker as hung."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=1.0)
    client = driver(kind, daemon.socket)
    try:
        proxy = client.request_proxy("stuck")
        assert client.attr(proxy, "info").call_timeout == 1.0
        old_pid = client.call(proxy, "pid")
        mark = tmp_path / "blocked"
        started = time.monotonic()
        with pytest.raises(ipc.TimedOut) as raised:  # no timeout given: the module's deadline
            client.call(proxy, "block_beating", {"seconds": 600.0, "mark": str(mark)})
        assert raised.value.details == {"sent": True}
        assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
        assert mark.exists()  # the module really blocked, beating from its thread
        hung = daemon.wait_for("worker.hung", of_module("stuck"))
        assert (hung["heartbeat"], hung["reason"], hung["worker_pid"]) == ("call", "call_timeout",
                                                                           old_pid)  # fmt: skip
        # Seen within call_timeout and a heartbeat interval or two, not never.
        assert time.monotonic() - started < 1.0 + 2 * INTERVAL + SLACK
        exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == old_pid)
        assert exited["cause"] == "hung"
        daemon.wait_for("module.state_changed",  # what clients and status are told, and why
                        lambda r: r.get("module") == "stuck" and r.get("state") == "exited"
                        and "call_timeout" in (r.get("reason") or ""))  # fmt: skip
        calls_answer_on_a_new_worker(client, proxy, old_pid)
        others_still_work(daemon)
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["trio", "blocking"])
def test_an_event_trickle_cannot_stretch_a_call(
    start_daemon: Start, tmp_path: Path, kind: str
) -> None:
    """A call's timeout holds over the whole call while events keep coming; the proxy lives on."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=30.0, heartbeat_timeout=30.0)
    client = driver(kind, daemon.socket)
    try:
        proxy = client.request_proxy("stuck")
        pid = client.call(proxy, "pid")
        started = time.monotonic()
        with pytest.raises(ipc.TimedOut):  # an event every 0.3 s for 3 s
            client.call(proxy, "trickle", {"count": 10, "every": 0.3}, timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
        # The late reply is dropped; the same proxy, on the same worker, answers the next call.
        assert client.call(proxy, "ping", timeout=WAIT) == "pong"
        assert client.call(proxy, "pid", timeout=WAIT) == pid
        # The late reply came first, and was dropped as expected (not as a stray).
        book = client.attr(proxy, "requests" if kind == "trio" else "_conn").book
        assert book.given_up == {}
        assert book.late == 1
        assert book.unknown == 0
        others_still_work(daemon)
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["trio", "blocking"])
def test_a_per_call_timeout_overrides_the_module_deadline(
    start_daemon: Start, tmp_path: Path, kind: str
) -> None:
    """A call given a longer timeout than call_timeout may take it; one given a shorter, not."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=30.0, heartbeat_timeout=30.0)
    client = driver(kind, daemon.socket)
    try:
        proxy = client.request_proxy("stuck")
        assert client.call(proxy, "trickle", {"count": 3, "every": 0.2}, timeout=WAIT) == 3
        with pytest.raises(ipc.TimedOut):
            client.call(proxy, "trickle", {"count": 3, "every": 0.2}, timeout=0.2)
        assert client.call(proxy, "ping", timeout=WAIT) == "pong"
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["trio", "blocking"])
def test_a_worker_that_stops_reading_its_channel(
    start_daemon: Start, tmp_path: Path, kind: str
) -> None:
    """Sends into a channel nobody reads fail at the call's deadline; other instances answer."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=30.0, heartbeat_timeout=30.0)
    client = driver(kind, daemon.socket)
    try:
        deaf, fine = client.request_proxy("stuck"), client.request_proxy("stuck")
        client.call(deaf, "stop_reading")
        # A few of these fill the channel's socket buffer. A call the description allows
        # (the client refuses an unknown argument before sending); the worker never reads it.
        pad = {"seconds": 0.0, "mark": "x" * 60_000}
        outcomes = []
        for _ in range(10):
            with pytest.raises(ipc.TimedOut) as raised:
                client.call(deaf, "block_beating", pad, timeout=0.3)
            outcomes.append(raised.value.details["sent"])
            if not outcomes[-1]:
                break
        assert outcomes[-1] is False, outcomes  # the send itself waited, within the deadline
        assert client.call(fine, "ping", timeout=WAIT) == "pong"
        others_still_work(daemon)
    finally:
        client.close()


def test_a_worker_deaf_to_its_control_socket_leaks_no_session(
    start_daemon: Start, tmp_path: Path
) -> None:
    """50 clients leave and 50 more come and go while the worker reads no control message.

    Their releases (CLOSE_INSTANCE) never wait on the full socket, their
    REQUEST_PROXY fails within start_timeout, and the daemon ends with the
    descriptors and sessions it had.
    """
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=30.0, start_timeout=1.0,
                          standby=False)  # fmt: skip
    with BlockingClient(daemon.socket) as admin, BlockingClient(daemon.socket) as attacker:
        deaf = attacker.request_proxy("stuck")
        admin.status()
        # Not while echo's standby is still being launched: its pipe, socket and cgroup
        # would be counted in the baseline, its pidfd and board afterwards.
        daemon.wait_for("worker.standby_ready", of_module("echo"))
        baseline = open_fds(daemon.proc.pid)
        fds_then = fd_targets(daemon.proc.pid)
        clients = [BlockingClient(daemon.socket) for _ in range(50)]
        # 1600 instances: their CLOSE_INSTANCEs overfill the socket, which holds about
        # 1,370 small packets now that it is sized for two MAX_PACKET messages.
        for client in clients:
            for _ in range(32):  # max_proxies_per_client
                client.request_proxy("stuck")
        deaf.call("deafen")
        for client in clients:
            client.close()
        daemon.wait_for("instance.close_dropped", of_module("stuck"))
        refused: list[BaseException] = []

        def come_and_go() -> None:
            with BlockingClient(daemon.socket) as client:
                try:
                    client.request_proxy("stuck")
                except ipc.ModuleUnavailable as exc:
                    refused.append(exc)

        threads = [threading.Thread(target=come_and_go) for _ in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert len(refused) == 50  # each told, within start_timeout, not left waiting
        assert "did not open an instance within 1s" in str(refused[0])
        wait_until(lambda: admin.status().daemon["clients"] == 2, timeout=10)
        status = admin.status()
        assert status.modules["stuck"]["proxies"] == 1  # the attacker's own, nothing leaked
        with contextlib.suppress(AssertionError):
            wait_until(lambda: open_fds(daemon.proc.pid) == baseline, timeout=10)
        now = fd_targets(daemon.proc.pid)
        changed = {fd: (fds_then.get(fd), now.get(fd)) for fd in fds_then.keys() | now.keys()
                   if fds_then.get(fd) != now.get(fd)}  # fmt: skip
        assert open_fds(daemon.proc.pid) == baseline, changed
        assert deaf.call("ping", timeout=WAIT) == "pong"  # its channel still works
        others_still_work(daemon)


def test_request_proxy_for_a_stuck_worker_is_bounded(start_daemon: Start, tmp_path: Path) -> None:
    """REQUEST_PROXY while the worker's loop is blocked is granted once the worker is replaced."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=1.0, start_timeout=2.0)
    with BlockingClient(daemon.socket) as attacker, BlockingClient(daemon.socket) as victim:
        proxy = attacker.request_proxy("stuck")
        old_pid = proxy.call("pid")
        mark = tmp_path / "blocked"
        with pytest.raises(ipc.TimedOut):
            proxy.call("block_beating", {"seconds": 600.0, "mark": str(mark)})
        started = time.monotonic()
        # Its OPEN_INSTANCE waits behind the stuck call; the worker is killed as hung and
        # the one that replaces it opens the instance: a grant, within start_timeout.
        other = victim.request_proxy("stuck")
        assert time.monotonic() - started < 2.0 + SLACK
        daemon.wait_for("worker.hung", lambda r: r.get("worker_pid") == old_pid)
        assert other.info.worker_pid != old_pid
        assert other.call("ping", timeout=WAIT) == "pong"
        assert other.call("pid", timeout=WAIT) != old_pid
        others_still_work(daemon)


def test_an_instance_that_opens_too_slowly(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A constructor that never returns fails REQUEST_PROXY in bound and gets its worker killed."""
    flag = tmp_path / "slow"
    flag.touch()
    tuning = tmp_path / "stuck.toml"
    tuning.write_text(f'slow_open_if_exists = "{flag}"\nopen_seconds = 600.0\n')
    env = {**daemon_env, "IPAD_STUCK_TUNING_FILE": str(tuning)}
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=1.0, start_timeout=3.0,
                          standby=False, env=env)  # fmt: skip
    old_pid = daemon.wait_for("worker.ready", of_module("stuck"))["worker_pid"]
    with BlockingClient(daemon.socket) as client:
        started = time.monotonic()
        with pytest.raises(ipc.ModuleUnavailable):
            client.request_proxy("stuck")
        assert time.monotonic() - started < 3.0 + SLACK
        hung = daemon.wait_for("worker.hung", lambda r: r.get("worker_pid") == old_pid)
        assert hung["reason"] == "call_timeout"  # the constructor is module code, timed too
        flag.unlink()
        # Wait for the replacement itself: a status read between the hang and the old
        # worker's exit still says "running" (seen once under load, then ModuleUnavailable).
        daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == old_pid)
        daemon.wait_for("worker.ready", lambda r: of_module("stuck")(r)
                        and r["worker_pid"] != old_pid)  # fmt: skip
        wait_until(lambda: client.status().modules["stuck"]["state"] == "running")
        proxy = client.request_proxy("stuck")
        assert proxy.call("pid", timeout=WAIT) != old_pid
        others_still_work(daemon)


def test_a_worker_that_dribbles_bytes_on_its_control_socket(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Packets of one byte are no messages: the worker is ended and replaced, nobody else hurt."""
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=5.0)
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("stuck")
        old_pid = proxy.call("pid")
        # The first byte is a protocol violation: the worker may be killed before it answers.
        with contextlib.suppress(ipc.WorkerCrashed):
            proxy.call("dribble", timeout=WAIT)
        daemon.wait_for("worker.protocol_violation", lambda r: r.get("worker_pid") == old_pid)
        exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == old_pid)
        assert exited.get("cause") == "protocol"
        assert proxy.call("pid", wait=WAIT, timeout=WAIT) != old_pid
        others_still_work(daemon)


# --- the heartbeat task against stalling workers, on trio's mock clock --------------------

BEAT_INTERVAL = 1.0
BEAT_TIMEOUT = 3.0
CALL_TIMEOUT = 5.0


@pytest.fixture
async def heartbeats() -> AsyncIterator[tuple[Heartbeats, trio.Nursery]]:
    """The daemon's heartbeat task, ticking in a nursery of the test's."""
    beats = Heartbeats()
    async with trio.open_nursery() as nursery:
        await nursery.start(beats.run)
        yield beats, nursery
        nursery.cancel_scope.cancel()


def control_pair() -> tuple[WorkerProcess, PacketSocket]:
    """A WorkerProcess as the daemon holds it, and the worker's end of its control socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return WorkerProcess("m", 0, -1, ours), PacketSocket(theirs, p.TO_WORKER_CONTROL)


async def test_a_worker_deaf_to_pings_holds_up_no_other_worker(
    heartbeats: tuple[Heartbeats, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    """A PING worker whose control socket is full is hung in time; the tick never waits on it."""
    beats, _ = heartbeats
    deaf, deaf_end = control_pair()
    healthy, healthy_end = control_pair()
    try:
        while deaf.control.send_nowait(p.Pong()):  # filled: it reads nothing, ever
            pass
        pings = 0

        async def answer() -> None:
            nonlocal pings
            while (frame := await healthy_end.receive()) is not None:
                pings += 1
                await healthy_end.send(p.Pong(), frame.request_id)

        hung: list[tuple[WorkerProcess, str]] = []
        async with trio.open_nursery() as own:  # ended before the sockets close
            own.start_soon(answer)
            own.start_soon(healthy.read_control)
            beats.watch(deaf, BEAT_INTERVAL, BEAT_TIMEOUT, lambda w, how: hung.append((w, how)))
            beats.watch(healthy, BEAT_INTERVAL, BEAT_TIMEOUT,
                        lambda w, how: hung.append((w, how)))  # fmt: skip
            started = trio.current_time()
            while not hung:
                await trio.sleep(0.1)
            assert hung == [(deaf, "ping")]
            assert trio.current_time() - started <= BEAT_TIMEOUT + 2 * BEAT_INTERVAL
            await trio.sleep(10 * BEAT_INTERVAL)
            assert hung == [(deaf, "ping")]
            assert pings >= 12  # the healthy worker was pinged on every tick throughout
            beats.forget(healthy)
            own.cancel_scope.cancel()
    finally:
        for worker, end in ((deaf, deaf_end), (healthy, healthy_end)):
            worker.close()
            end.close()


async def test_a_call_that_outlasts_call_timeout_is_a_hang_however_it_beats(
    heartbeats: tuple[Heartbeats, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    """Beats from a thread hide nothing: one call seen running for call_timeout is a hang."""
    beats, nursery = heartbeats
    worker, end = control_pair()
    worker.board = new_board()
    beater = Beater(worker.board, BEAT_INTERVAL)
    try:

        async def beat() -> None:  # the module's own thread, beating whatever the loop does
            while True:
                beater.beat()
                await trio.sleep(BEAT_INTERVAL / 4)

        nursery.start_soon(beat)
        hung: list[str] = []
        beats.watch(worker, BEAT_INTERVAL, BEAT_TIMEOUT, lambda _, how: hung.append(how),
                    CALL_TIMEOUT)  # fmt: skip
        for _ in range(20):  # short calls one after another, for far longer than call_timeout
            beater.enter()
            await trio.sleep(CALL_TIMEOUT / 2)
            beater.leave()
        assert hung == []
        beater.enter()  # one call that never returns
        started = trio.current_time()
        while not hung:
            await trio.sleep(0.1)
        assert hung == ["call"]
        assert CALL_TIMEOUT <= trio.current_time() - started <= CALL_TIMEOUT + 2 * BEAT_INTERVAL
    finally:
        worker.close()
        end.close()


# --- the configuration ---------------------------------------------------------------


def test_call_timeout_has_a_default_an_override_and_no_zero(tmp_path: Path) -> None:
    """call_timeout: 10 s by default, [restart] and per module like the other timeouts, never 0."""
    path = tmp_path / "c.toml"
    config = parse_config("[restart]\ncall_timeout = '2s'\n[modules.a]\n[modules.b.restart]\n"
                          "call_timeout = '250ms'\n", path)  # fmt: skip
    assert config.restart_policy("a").call_timeout.seconds == 2.0
    assert config.restart_policy("b").call_timeout.seconds == 0.25
    assert parse_config("[modules.a]\n", path).restart_policy("a").call_timeout.seconds == 10.0
    for text in ("[restart]\ncall_timeout = '0'\n", "[modules.a.restart]\ncall_timeout = '0'\n"):
        with pytest.raises(ConfigError) as raised:
            parse_config(text, path)
        assert any("call_timeout: must not be zero" in str(x) for x in raised.value.problems)


def test_a_proxy_released_while_its_instance_opens_is_not_granted(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """RELEASE_PROXY of a guessed id during the open: REQUEST_PROXY fails, the daemon serves on."""
    flag = tmp_path / "slow"
    flag.touch()
    tuning = tmp_path / "stuck.toml"
    tuning.write_text(f'slow_open_if_exists = "{flag}"\nopen_seconds = 1.0\n')
    env = {**daemon_env, "IPAD_STUCK_TUNING_FILE": str(tuning)}
    daemon = stuck_daemon(start_daemon, tmp_path, call_timeout=5.0, heartbeat_timeout=5.0,
                          standby=False, env=env)  # fmt: skip
    daemon.wait_for("worker.ready", of_module("stuck"))
    with BlockingClient(daemon.socket) as client:
        # The next proxy id, as a hostile client would guess it.
        guessed = client.request_proxy("echo").proxy_id + 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(WAIT)
        raw.connect(str(daemon.socket))
        hello(raw)
        raw.send(p.encode(p.RequestProxy("stuck"), 2))
        time.sleep(0.3)  # the instance is being constructed (1 s)
        raw.send(p.encode(p.ReleaseProxy(guessed), 3))
        replies: dict[int, p.Message] = {}
        while len(replies) < 2:
            frame = receive(raw)
            assert frame is not None
            frame.close_fds()
            if frame.request_id in (2, 3):
                replies[frame.request_id] = frame.message
    assert isinstance(replies[3], p.Released)
    assert isinstance(replies[2], p.Error)
    assert replies[2].code == p.ErrorCode.UNKNOWN_PROXY.value, replies[2]
    assert daemon.events("request.internal_error") == []
    flag.unlink()
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("stuck").call("pid", timeout=WAIT) > 0
        assert client.status().daemon["proxies"] == 1
    others_still_work(daemon)
