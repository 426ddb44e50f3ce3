"""The fast path from a worker's crash back to a valid proxy, with real processes.

A client asks for a new channel the moment its old one breaks, usually before
the daemon has seen the worker die; the daemon answers once a new worker runs.
The standby worker holds a spare instance for every proxy, so the answer needs
no round trip to the new worker; a new standby is prepared only once the
clients have recovered.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.protocol import wire as p
from tests.daemon_process import (
    DaemonProcess,
    Record,
    fd_targets,
    of_module,
    open_fds,
    wait_until,
    write_config,
)
from tests.raw_client import Connect as RawConnect
from tests.raw_client import hello, receive

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]

ECHO = "[modules.echo]\n"


def status_of(daemon: DaemonProcess, module: str) -> dict[str, Any]:
    """One module's entry of ``ipadctl --json status``."""
    modules: dict[str, dict[str, Any]] = json.loads(daemon.ctl("--json", "status").stdout)[
        "modules"
    ]
    return modules[module]


def refusals(daemon: DaemonProcess) -> list[Record]:
    """REOPEN_PROXY (or any request) refused because the module was not running."""
    return [r for r in daemon.events("request.failed") if r.get("code") == "module_unavailable"]


def test_reopen_sent_before_the_crash_is_seen_waits_for_the_new_worker(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A REOPEN_PROXY the daemon reads before it notices the death is answered, not refused."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    standby = daemon.wait_for("worker.standby_ready", of_module("echo"))
    with BlockingClient(daemon.socket) as client:
        echo = client.request_proxy("echo")
        old = echo.call("pid")
        # Frozen, the daemon cannot see the exit: the request waits in its socket
        # next to the pidfd's news, as when a client is quicker than the daemon.
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: not Path(f"/proc/{old}/cmdline").read_bytes())
            request_id = client._conn.book.open().request_id
            reopen = p.encode(p.ReopenProxy(echo.proxy_id), request_id)
            client._conn.sock.send(reopen)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        frame = client._conn.reply(request_id, time.monotonic() + 30)
        granted = frame.message
        frame.close_fds()
    assert isinstance(granted, p.ProxyGranted), granted
    assert granted.worker_pid == standby["worker_pid"] != old
    assert refusals(daemon) == []


def test_standby_holds_a_spare_instance_for_every_proxy(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Proxies reopen on instances the standby opened ahead of time; releases give them back."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    with BlockingClient(daemon.socket) as client:
        proxies = [client.request_proxy("echo") for _ in range(3)]
        wait_until(lambda: status_of(daemon, "echo")["standby_instances"] == 3)
        proxies.pop().release()
        wait_until(lambda: status_of(daemon, "echo")["standby_instances"] == 2)
        old = proxies[0].call("pid")
        standby = status_of(daemon, "echo")["standby_pid"]
        os.kill(old, signal.SIGKILL)
        assert [proxy.call("pid", wait=10) for proxy in proxies] == [standby, standby]
    reopened = [r for r in daemon.events("instance.opened") if r["worker_pid"] == standby]
    handed_out = [r for r in reopened if r["spare"]]
    assert len(handed_out) == 2, reopened
    assert refusals(daemon) == []


async def test_new_standby_waits_for_the_clients_to_recover(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The next standby is forked only after the proxies are valid again (or 100 ms later)."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        await echo.call("init", {"settings": {}})
        first = daemon.wait_for("worker.standby_ready", of_module("echo"))
        old = await echo.call("pid")
        os.kill(old, signal.SIGKILL)
        with trio.fail_after(30):
            async for event in client.events:  # the daemon's own announcement of the recovery
                if isinstance(event, p.Event) and event.reason == "recovered":
                    break
    exited = daemon.wait_for("worker.exited", lambda r: r["worker_pid"] == old)
    valid = daemon.wait_for(
        "proxy.state_changed", lambda r: r["proxy_id"] == echo.proxy_id and r["state"] == "valid"
        and r.get("reason") == "recovered",
    )  # fmt: skip
    nxt = daemon.wait_for(
        "worker.standby_ready",
        lambda r: r["module"] == "echo" and r["worker_pid"] != first["worker_pid"],
    )
    started = daemon.wait_for(
        "worker.forked", lambda r: r["module"] == "echo" and r["worker_pid"] == nxt["worker_pid"]
    )
    stamp = {k: _t(r) for k, r in {"exited": exited, "valid": valid, "forked": started}.items()}
    assert stamp["forked"] >= min(stamp["valid"], stamp["exited"] + 0.1)


def _t(record: Record) -> float:
    from datetime import datetime  # noqa: PLC0415 - only here

    return datetime.fromisoformat(record["timestamp"]).timestamp()


async def test_subscribed_client_reads_invalid_before_the_new_grant(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Events reach a client in seq order, and before the reply that follows them."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        old = await echo.call("pid")
        os.kill(old, signal.SIGKILL)
        seen: list[Any] = []
        with trio.fail_after(30):
            async for event in client.events:
                seen.append(event)
                if getattr(event, "kind", None) == "recovered":
                    break
    daemon_events = [e for e in seen if isinstance(e, p.Event)]
    seqs = [e.seq for e in daemon_events]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    ours = [(e.state, e.worker_pid) for e in daemon_events if e.proxy_id == echo.proxy_id]
    assert ("invalid", old) in ours
    assert echo.info.seq >= max(e.seq for e in daemon_events if e.proxy_id == echo.proxy_id)


def assert_fds_back(daemon: DaemonProcess, baseline: dict[int, str]) -> None:
    """Once the clients left and the standby settled, the daemon holds ``baseline``'s count."""
    wait_until(lambda: status_of(daemon, "echo")["proxies"] == 0)
    daemon.wait_standbys()
    try:
        wait_until(lambda: open_fds(daemon.proc.pid) == len(baseline), timeout=5)
    except AssertionError:
        added = sorted(set(fd_targets(daemon.proc.pid).items()) - set(baseline.items()))
        raise AssertionError(f"fds added {added}") from None


def test_spares_no_proxy_took_are_closed_once_their_clients_left(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A promoted standby's spares whose clients left before reopening hold no descriptor."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    daemon.wait_standbys()
    baseline = fd_targets(daemon.proc.pid)
    with BlockingClient(daemon.socket) as client:
        proxies = [client.request_proxy("echo") for _ in range(3)]
        old = proxies[0].call("pid")
        daemon.wait_standbys()
        standby = status_of(daemon, "echo")["standby_pid"]
        os.kill(old, signal.SIGKILL)
        # The standby is promoted with three spares; the client leaves without reopening.
        wait_until(lambda: status_of(daemon, "echo")["worker_pid"] == standby)
    assert_fds_back(daemon, baseline)


def unread(pid: int, fd: int) -> tuple[int, int]:
    """Bytes waiting in process ``pid``'s unix socket ``fd``, and in its peer's (from ss)."""
    inode = str(Path(f"/proc/{pid}/fd/{fd}").readlink()).removeprefix("socket:[").rstrip("]")
    ss = shutil.which("ss")
    assert ss is not None, "iproute2's ss is needed to see what waits in a socket"
    listing = subprocess.run([ss, "-xanH"], capture_output=True, text=True, check=True).stdout
    # Each line: netid state recv-q send-q local-address local-inode peer-address peer-inode
    queued = {fields[5]: (int(fields[2]), fields[7])
              for line in listing.splitlines() if len(fields := line.split()) >= 8}  # fmt: skip
    ours, peer = queued[inode]
    return ours, queued[peer][0]


def state_of(pid: int) -> str:
    """A process's state letter, from /proc/<pid>/stat (after its command's parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_spare_answered_as_its_standby_dies_is_closed(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A standby's INSTANCE_OPENED read in the same pass as its death leaves no descriptor open."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    daemon.wait_standbys()
    baseline = fd_targets(daemon.proc.pid)
    standby = status_of(daemon, "echo")["standby_pid"]
    os.kill(standby, signal.SIGSTOP)  # its OPEN_INSTANCE waits unread
    try:
        with BlockingClient(daemon.socket) as client:
            client.request_proxy("echo")  # the standby is asked for a spare for it
            wait_until(lambda: unread(standby, 3)[0] > 0)
            # The standby answers and dies while the daemon is frozen: both wait for it.
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                os.kill(standby, signal.SIGCONT)
                wait_until(lambda: unread(standby, 3)[1] > 0)  # its INSTANCE_OPENED
                os.kill(standby, signal.SIGKILL)
                wait_until(lambda: state_of(standby) == "Z")  # dead, reaped by nobody yet
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)
            daemon.wait_for("worker.standby_exited", lambda r: r["worker_pid"] == standby)
            daemon.wait_standbys()  # the next standby, with its own spare for the proxy
    finally:  # not left stopped should a step fail (the daemon owns and ends it)
        with contextlib.suppress(ProcessLookupError):
            os.kill(standby, signal.SIGCONT)
    assert_fds_back(daemon, baseline)


@pytest.mark.parametrize("isolation", ["module", "proxy"])
def test_a_proxy_ready_read_after_the_new_worker_died_leaves_the_proxy_invalid(
    start_daemon: Start, tmp_path: Path, raw_connect: RawConnect, isolation: str
) -> None:
    """The reopened proxy's worker dies before PROXY_READY is read: announced, and stays invalid.

    A client sends PROXY_READY without waiting for its answer, so the new
    worker may die before the daemon reads it: the proxy was never valid on
    that worker, and the daemon does not say it was (PROXY_STATE invalid). But
    the client counted itself valid: that worker's end gets an invalid event of
    its own, with its reason. The next recovery publishes it valid. Here the
    daemon is made to see the death first, every time (in a client's hands this
    ordering is a race).
    """
    modules = f'[modules.echo]\nisolation = "{isolation}"\n'
    daemon = start_daemon(write_config(tmp_path, modules=modules))
    sock = raw_connect(daemon.socket)
    hello(sock)
    channels: list[int] = []  # kept open: closing one would close or empty its proxy
    request_ids = iter(range(2, 100))

    def ask(message: p.Message) -> p.Message:
        request_id = next(request_ids)
        sock.send(p.encode(message, request_id))
        frame = receive(sock)
        assert frame is not None
        assert frame.request_id == request_id
        channels.extend(frame.fds)
        return frame.message

    def kill_and_see(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        # A per-proxy worker's states are logged as its proxy's, not its module's.
        kind = "module.state_changed" if isolation == "module" else "proxy.worker_state"
        daemon.wait_for(kind, lambda r: r["state"] == "exited" and r["worker_pid"] == pid)

    try:
        granted = ask(p.RequestProxy("echo"))
        assert isinstance(granted, p.ProxyGranted), granted
        proxy_id, first = granted.proxy_id, granted.worker_pid
        kill_and_see(first)
        reopened = ask(p.ReopenProxy(proxy_id))
        assert isinstance(reopened, p.ProxyGranted), reopened
        second = reopened.worker_pid
        assert second != first
        assert reopened.state == "invalid"
        kill_and_see(second)  # before the daemon reads PROXY_READY
        late = ask(p.ProxyReady(proxy_id, 0))
        assert isinstance(late, p.ProxyStateReply), late
        assert late.state == "invalid"
        reopened = ask(p.ReopenProxy(proxy_id))
        assert isinstance(reopened, p.ProxyGranted), reopened
        third = reopened.worker_pid
        assert third not in (first, second)
        ready = ask(p.ProxyReady(proxy_id, 0))
        assert isinstance(ready, p.ProxyStateReply), ready
        assert ready.state == "valid"
        daemon.wait_for("proxy.state_changed", lambda r: r.get("reason") == "recovered")
    finally:
        p.close_fds(channels)
    changes = [
        (r["state"], r.get("reason"), r["worker_pid"])
        for r in daemon.events("proxy.state_changed")
        if r["proxy_id"] == proxy_id and r["state"] != "closed"  # closed with its channel
    ]
    assert changes == [
        ("valid", None, first),
        ("invalid", "worker exited with signal SIGKILL", first),
        ("invalid", "worker exited with signal SIGKILL", second),
        ("valid", "recovered", third),
    ]


def test_the_cause_of_a_reopened_proxy_s_end_is_that_end_s_not_the_crash_before(
    start_daemon: Start, tmp_path: Path, raw_connect: RawConnect
) -> None:
    """PROXY_CAUSE about a worker a proxy was reopened on: its own end (an operator's stop).

    The proxy is invalid from the crash before, its PROXY_READY not sent: asked
    while that worker still runs, the daemon answers once the worker's end is
    known, not at the stop's first step with the earlier crash's reason.
    """
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    sock = raw_connect(daemon.socket)
    sock.send(p.encode(p.Hello((p.PROTOCOL_VERSION,), "raw", minor=p.PROTOCOL_MINOR), 1))
    welcome = receive(sock)
    assert welcome is not None
    assert isinstance(welcome.message, p.Welcome)
    channels: list[int] = []

    def ask(message: p.Message, request_id: int) -> p.Message:
        sock.send(p.encode(message, request_id))
        frame = receive(sock)
        assert frame is not None
        assert frame.request_id == request_id
        channels.extend(frame.fds)
        return frame.message

    try:
        granted = ask(p.RequestProxy("echo"), 2)
        assert isinstance(granted, p.ProxyGranted), granted
        proxy_id, first = granted.proxy_id, granted.worker_pid
        os.kill(first, signal.SIGKILL)
        reopened = ask(p.ReopenProxy(proxy_id), 3)
        assert isinstance(reopened, p.ProxyGranted), reopened
        second = reopened.worker_pid
        sock.send(p.encode(p.ProxyCause(proxy_id, second), 4))  # its worker runs: it waits
        with BlockingClient(daemon.socket) as admin:
            assert admin.admin("stop", "echo")["state"] == "stopped"
        frame = receive(sock)
        assert frame is not None
        assert frame.request_id == 4
        reply = frame.message
        assert isinstance(reply, p.ProxyCauseReply), reply
        assert reply.state == "invalid"
        assert reply.reason.startswith("module echo stopped by operator ("), reply.reason
    finally:
        p.close_fds(channels)
