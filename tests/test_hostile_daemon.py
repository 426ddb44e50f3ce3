"""What a worker controls cannot make the daemon fail others: sizes, strings, floods, output.

Each test runs a real daemon with a hostile module next to a well-behaved one
and proves from the outside that the attack failed and that everyone else
carried on: ``ipadctl status`` answers (about as fast as before the attack),
another module's calls answer, subscribed clients keep receiving events, the
daemon's descriptors come back to their baseline, and it stops cleanly with
SIGTERM at the end (the ``start_daemon`` fixture's own check).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.daemon.bounds import MAX_TEXT, MAX_VERSION
from ipad.daemon.relay import RELAY_BURST
from ipad.daemon.worker_process import UNSOLICITED_BURST
from ipad.protocol import wire as p
from tests.daemon_process import (
    REPO,
    TEST_MODULES,
    DaemonProcess,
    open_fds,
    rss_kib,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]

#: How much the daemon may grow for good from one attack (allocator pages kept, caches).
RSS_SLACK_KIB = 8 * 1024

#: The longest text an ``echo`` call's CALL and RESULT both carry within MAX_PAYLOAD.
LARGEST_ECHO = p.MAX_PAYLOAD - 64


def test_a_256_kib_echo_works_with_the_blocking_client(start_daemon: Start) -> None:
    """A call whose CALL and RESULT are as large as the payload limit allows goes through."""
    daemon = start_daemon()
    text = "x" * LARGEST_ECHO
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("echo")
        assert proxy.call("echo", {"text": text}) == {"text": text}
        assert proxy.valid
        assert proxy.call("count") == 1


async def test_a_256_kib_echo_works_with_the_trio_client(start_daemon: Start) -> None:
    """The same largest echo through the trio client, and the proxy stays valid."""
    daemon = start_daemon()
    text = "y" * LARGEST_ECHO
    async with ipc.open_client(daemon.socket) as client:
        proxy = await client.request_proxy("echo")
        with trio.fail_after(30):
            assert await proxy.call("echo", {"text": text}) == {"text": text}
            assert await proxy.call("count") == 1


def of_module(module: str) -> Callable[[dict[str, object]], bool]:
    """A log record about ``module``."""
    return lambda record: record.get("module") == module


def hostile_config(directory: Path, module: str = "liar") -> Path:
    """The hostile module next to the well-behaved echo."""
    daemon = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}", "{REPO / "workers" / "modules"}"]'
    return write_config(directory, daemon, modules=f"[modules.{module}]\n[modules.echo]\n")


def status_latency(client: BlockingClient, rounds: int = 20) -> float:
    """The median time one STATUS takes."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.status()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def others_unharmed(daemon: DaemonProcess, client: BlockingClient, baseline: float) -> None:
    """`ipadctl status` answers, STATUS is about as fast as before, echo answers."""
    daemon.ctl("status")
    assert status_latency(client) < max(20 * baseline, 0.05)
    echo = client.request_proxy("echo")
    assert echo.call("echo", {"text": "still here"}) == {"text": "still here"}
    echo.release()


def test_a_huge_version_is_capped_where_the_daemon_receives_it(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A 261 KB READY version is cut to MAX_VERSION: status answers for everyone."""
    daemon = start_daemon(hostile_config(tmp_path, "bigversion"))
    with BlockingClient(daemon.socket) as client:
        version = client.status().modules["bigversion"]["version"]
        assert version.startswith("1.999")
        assert version.endswith("bytes]")
        assert len(version) < MAX_VERSION + 40
        proxy = client.request_proxy("bigversion")
        assert proxy.call("ping") == "pong"
        others_unharmed(daemon, client, status_latency(client))
    assert daemon.ctl("status").returncode == 0


def test_a_huge_close_reason_is_capped_and_subscribers_keep_receiving(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A 262 KB INSTANCE_CLOSED reason reaches subscribers cut, and later events still come."""
    daemon = start_daemon(hostile_config(tmp_path))
    with BlockingClient(daemon.socket) as client, BlockingClient(daemon.socket) as watcher:
        watcher.subscribe()
        proxy = client.request_proxy("liar")
        assert proxy.call("close_reason", {"size": 262_000, "instance_ids": list(range(1, 9))})
        closed = _next_event(watcher, lambda e: e.module == "liar" and e.proxy_id is not None
                             and e.reason is not None and e.reason.startswith("rrr"))  # fmt: skip
        assert closed.reason is not None
        assert closed.reason.endswith("bytes]")
        assert len(closed.reason) < MAX_TEXT + 40
        daemon.ctl("restart", "echo")  # a later event still reaches the subscriber
        _next_event(watcher, lambda e: e.module == "echo" and e.state == "running")
        others_unharmed(daemon, client, status_latency(client))


def _next_event(client: BlockingClient, match: Callable[[p.Event], bool]) -> p.Event:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        event = client.next_event(timeout=1)
        if event is not None and match(event):
            return event
    raise AssertionError("no such event within 20 s")


@pytest.mark.parametrize(
    ("method", "args", "violation"),
    [
        ("flood", {"kind": "replies", "count": 100_000}, "which was never sent"),
        ("flood", {"kind": "closes", "count": 100_000}, "unsolicited control messages"),
        ("flood", {"kind": "late", "count": 100_000}, "unsolicited control messages"),
        ("malformed", {"how": "hello"}, "unexpected message HELLO"),
        ("malformed", {"how": "huge"}, "packet larger than"),
        ("malformed", {"how": "fds"}, "file descriptors"),
    ],
)
def test_a_worker_that_lies_on_the_wire_is_killed_for_it(
    start_daemon: Start, tmp_path: Path, method: str, args: dict[str, object], violation: str
) -> None:
    """A worker that breaks the protocol is killed (cause protocol) and restarted; others carry on."""
    daemon = start_daemon(hostile_config(tmp_path))
    with BlockingClient(daemon.socket) as client:
        daemon.wait_standbys()
        baseline = status_latency(client)
        fds, rss = open_fds(daemon.proc.pid), rss_kib(daemon.proc.pid)
        first = daemon.worker_pids()["liar"]
        proxy = client.request_proxy("liar")
        with contextlib.suppress(Exception):  # killed mid-call, perhaps: the call fails
            proxy.call(method, args, timeout=20)
        killed = daemon.wait_for("worker.protocol_violation", lambda r: r["worker_pid"] == first)
        assert violation in killed["reason"]
        exited = daemon.wait_for("worker.exited", lambda r: r["worker_pid"] == first)
        assert exited["cause"] == "protocol"
        report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == first)
        assert report["kind"] == "protocol"
        assert len(daemon.events("reply.dropped")) <= UNSOLICITED_BURST
        others_unharmed(daemon, client, baseline)
        wait_until(lambda: proxy.call("ping", timeout=5) == "pong", timeout=20)
        proxy.release()
        daemon.wait_standbys()
        wait_until(lambda: open_fds(daemon.proc.pid) <= fds, timeout=20)
        assert rss_kib(daemon.proc.pid) < rss + RSS_SLACK_KIB


def test_a_flood_of_bare_newlines_leaves_the_daemon_responsive(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Bare newlines on stderr as fast as it can: status stays fast, echo answers, drops counted.

    The relay empties a pipe past its budget only every RELAY_PAUSE, so the writer is slowed
    down: a call that writes for longer than the heartbeat timeout is killed as hung.
    """
    daemon = start_daemon(hostile_config(tmp_path))
    with BlockingClient(daemon.socket) as client, BlockingClient(daemon.socket) as attacker:
        baseline = status_latency(client)
        fds, rss = open_fds(daemon.proc.pid), rss_kib(daemon.proc.pid)
        proxy = attacker.request_proxy("liar")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            writing = pool.submit(proxy.call, "newlines", {"megabytes": 64}, timeout=60)
            time.sleep(0.5)
            others_unharmed(daemon, client, baseline)
            assert not writing.done()  # slowed down by the relay, not finished in a blink
            with contextlib.suppress(ipc.WorkerCrashed):  # killed as hung, most likely
                writing.result()
        report = daemon.wait_for("worker.stderr_suppressed", of_module("liar"), timeout=20)
        assert report["dropped_bytes"] > 0
        relayed = [r for r in daemon.events("worker.stderr") if r["module"] == "liar"]
        assert len(relayed) <= 2 * RELAY_BURST
        proxy.release()
        wait_until(lambda: open_fds(daemon.proc.pid) <= fds, timeout=20)
        assert rss_kib(daemon.proc.pid) < rss + RSS_SLACK_KIB


def test_many_clients_leaving_at_once_do_not_get_a_worker_killed(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Closes its worker reports for instances it held are no lies, however many come at once."""
    daemon = start_daemon(hostile_config(tmp_path))
    with BlockingClient(daemon.socket) as watcher:
        pid = watcher.status().modules["echo"]["worker_pid"]
        clients = [BlockingClient(daemon.socket) for _ in range(5)]
        for client in clients:
            for _ in range(30):  # 150 proxies: past UNSOLICITED_BURST
                client.request_proxy("echo")
        for client in clients:
            client.close()  # every channel ends: the worker reports each instance closed
        wait_until(lambda: watcher.status().daemon["proxies"] == 0, timeout=20)
        assert watcher.status().modules["echo"]["worker_pid"] == pid
        assert not daemon.events("worker.protocol_violation")
