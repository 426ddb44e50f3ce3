"""What the daemon tells systemd: the STATUS= counts, READY/RELOADING/STOPPING, watchdog pings."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from ipad.config.model import RestartMode
from ipad.daemon.events import EventBus
from ipad.daemon.service import ModuleHealth, ServiceNotifier, module_health, status_line
from ipad.daemon.states import WorkerState
from ipad.daemon.systemd import Notifier

H = ModuleHealth


@pytest.mark.parametrize(
    ("state", "clean", "restart", "expected"),
    [
        (WorkerState.RUNNING, False, RestartMode.ON_FAILURE, H.VALID),
        (WorkerState.STARTING, False, RestartMode.ON_FAILURE, H.RESTARTING),
        (WorkerState.EXITED, False, RestartMode.ON_FAILURE, H.RESTARTING),
        (WorkerState.EXITED, True, RestartMode.ALWAYS, H.RESTARTING),
        (WorkerState.EXITED, True, RestartMode.ON_FAILURE, H.EXITED),
        (WorkerState.EXITED, True, RestartMode.NEVER, H.EXITED),
        (WorkerState.COOLDOWN, False, RestartMode.ON_FAILURE, H.COOLDOWN),
        (WorkerState.FAILED, False, RestartMode.NEVER, H.FAILED),
        (WorkerState.STOPPING, False, RestartMode.ON_FAILURE, H.STOPPED),
        (WorkerState.STOPPED, False, RestartMode.ON_FAILURE, H.STOPPED),
    ],
)
def test_module_health(
    state: WorkerState, clean: bool, restart: RestartMode, expected: ModuleHealth
) -> None:
    """Each worker state counts where an operator expects it; a clean exit only if it stays."""
    assert module_health(state, exited_cleanly=clean, restart=restart) is expected


def test_status_line_always_shows_the_four_main_counts() -> None:
    """Valid, restarting, cooldown and failed are always there, then the proxies."""
    assert (
        status_line([H.VALID] * 3, 2)
        == "3 modules valid, 0 restarting, 0 in cooldown, 0 failed; 2 proxies"
    )


def test_status_line_singular_and_rare_counts() -> None:
    """One module, one proxy; exited and stopped modules appear only when there are some."""
    assert (
        status_line([H.VALID], 1)
        == "1 module valid, 0 restarting, 0 in cooldown, 0 failed; 1 proxy"
    )
    assert status_line([H.VALID, H.RESTARTING, H.EXITED, H.STOPPED, H.COOLDOWN], 0) == (
        "1 module valid, 1 restarting, 1 in cooldown, 0 failed, 1 exited, 1 stopped; 0 proxies"
    )
    assert status_line([], 0) == "0 modules valid, 0 restarting, 0 in cooldown, 0 failed; 0 proxies"


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, Notifier]]:
    """A datagram socket standing for systemd's notify socket, and a Notifier aimed at it."""
    name = f"\0ipad-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(name)
    sock.setblocking(False)
    notifier = Notifier(name)
    yield sock, notifier
    notifier.close()
    sock.close()


def received(sock: socket.socket) -> list[dict[str, str]]:
    """Every message systemd would have received so far, as dicts."""
    messages: list[dict[str, str]] = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return messages
        lines = data.decode().splitlines()
        messages.append(dict(line.split("=", 1) for line in lines))


async def test_start_ready_reload_stop_sequence(manager: tuple[socket.socket, Notifier]) -> None:
    """STATUS while starting, READY with counts, RELOADING stamped, READY again, STOPPING."""
    sock, notifier = manager
    service = ServiceNotifier(notifier)
    await service.starting(3)
    await service.status("ignored until ready")
    await service.ready("3 modules valid")
    await service.reloading("3 modules valid")
    await service.ready("2 modules valid")
    await service.stopping("2 modules valid")
    messages = received(sock)
    assert messages[0] == {"STATUS": "starting 3 modules"}
    assert messages[1] == {"READY": "1", "STATUS": "3 modules valid"}
    assert messages[2]["RELOADING"] == "1"
    assert int(messages[2]["MONOTONIC_USEC"]) > 0
    assert messages[2]["STATUS"] == "reloading: 3 modules valid"
    assert messages[3:] == [
        {"READY": "1", "STATUS": "2 modules valid"},
        {"STOPPING": "1", "STATUS": "stopping: 2 modules valid"},
    ]


async def test_status_is_sent_only_when_it_changes(
    manager: tuple[socket.socket, Notifier],
) -> None:
    """The same counts twice make one STATUS=, not two."""
    sock, notifier = manager
    service = ServiceNotifier(notifier)
    await service.ready("a")
    await service.status("a")
    await service.status("b")
    await service.status("b")
    assert received(sock) == [{"READY": "1", "STATUS": "a"}, {"STATUS": "b"}]


async def test_follow_sends_one_status_per_burst_of_events(
    manager: tuple[socket.socket, Notifier],
) -> None:
    """Three module events published together give one recount and one STATUS=."""
    sock, notifier = manager
    service = ServiceNotifier(notifier)
    await service.ready("before")
    received(sock)
    bus = EventBus()
    counts = iter(["after", "later"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.follow, bus, lambda: next(counts))
        await trio.testing.wait_all_tasks_blocked()
        for module in ("awb", "agc", "echo"):
            bus.publish("module", module, state="exited")
        await trio.testing.wait_all_tasks_blocked()
        assert received(sock) == [{"STATUS": "after"}]
        bus.publish("proxy", "awb", proxy_id=1, state="valid")
        await trio.testing.wait_all_tasks_blocked()
        assert received(sock) == [{"STATUS": "later"}]
        nursery.cancel_scope.cancel()


async def test_watchdog_pings_twice_per_interval(
    manager: tuple[socket.socket, Notifier], autojump_clock: trio.testing.MockClock
) -> None:
    """With WatchdogSec=2s, WATCHDOG=1 goes every second from the event loop."""
    sock, notifier = manager
    service = ServiceNotifier(notifier, watchdog_usec=2_000_000)
    with trio.move_on_after(10.5):
        await service.keep_watchdog()
    assert received(sock) == [{"WATCHDOG": "1"}] * 11


async def test_no_watchdog_no_pings(manager: tuple[socket.socket, Notifier]) -> None:
    """Without WATCHDOG_USEC the task ends at once."""
    sock, notifier = manager
    await ServiceNotifier(notifier).keep_watchdog()
    assert received(sock) == []


async def test_a_failing_send_is_logged_once() -> None:
    """With systemd gone: one warning for that failure, not one per ping."""
    service = ServiceNotifier(Notifier("/nonexistent/notify"))
    with capture_logs() as logs:
        await service.ready("x")
        await service.status("y")
        await service.stopping("z")
    service.close()
    assert [entry["event"] for entry in logs] == ["systemd.notify_failed"]
    assert logs[0]["error"] == "ENOENT: No such file or directory"


async def test_a_busy_manager_delays_messages_but_loses_none(
    manager: tuple[socket.socket, Notifier], autojump_clock: trio.testing.MockClock
) -> None:
    """With the manager's queue full, sends wait until it reads again; nothing is dropped."""
    sock, notifier = manager
    service = ServiceNotifier(notifier)
    sent = 0
    async with trio.open_nursery() as nursery:

        async def flood() -> None:
            nonlocal sent
            for n in range(2000):  # far more than a datagram queue holds
                await service._send(N=n)
                sent += 1

        nursery.start_soon(flood)
        await trio.sleep(1)
        assert 0 < sent < 2000  # the queue filled: the sender waits
        got: list[dict[str, str]] = []
        while len(got) < 2000:
            got += received(sock)
            await trio.sleep(0.01)
    assert [int(m["N"]) for m in got] == list(range(2000))


async def test_a_wedged_manager_does_not_wedge_the_daemon(
    manager: tuple[socket.socket, Notifier], autojump_clock: trio.testing.MockClock
) -> None:
    """A queue that never drains: each message gives up after NOTIFY_TIMEOUT, logged once."""
    _sock, notifier = manager
    service = ServiceNotifier(notifier)
    with capture_logs() as logs:
        with trio.move_on_after(60):
            while True:
                await service._send(WATCHDOG=1)
    assert [entry["event"] for entry in logs] == ["systemd.notify_failed"]
    assert logs[0]["error"] == "not taken within 5s"
