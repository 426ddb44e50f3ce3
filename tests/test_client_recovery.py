"""Both clients recover as the README promises, shown by one set of tests run against each.

Every test body drives either the trio client (run in a thread of its own) or
the blocking client through the same small adapter (tests/client_drivers.py),
against a real daemon, real workers and real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from ipad import client as ipc
from ipad.client._core import RECONNECT_INITIAL, RECONNECT_MAX
from tests.buffers import write_memfd
from tests.client_drivers import Connect, Start, connect, proxies_held
from tests.daemon_process import (
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    alive,
    wait_until,
    write_config,
)

__all__ = ["connect"]  # the fixture, used by most tests here

pytestmark = pytest.mark.timeout(120)

FAULTY = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'

#: What a grey-world AWB gets each frame: red, green and blue sums and the pixel count.
STATS = struct.pack("<4I", 12000, 10000, 7000, 100)


def module_status(daemon: DaemonProcess, module: str) -> dict[str, Any]:
    """One module's entry of ``ipadctl --json status``."""
    return dict(json.loads(daemon.ctl("--json", "status").stdout)["modules"][module])


def proxy_losses(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """What the issue saw: requests refused for a proxy the daemon closed, or past a limit."""
    bad = {"unknown_proxy", "limit_exceeded"}
    failed = [r for r in daemon.events("request.failed") if r.get("code") in bad]
    return failed + daemon.events("client.limit_exceeded")


class Frozen:
    """The daemon stopped (SIGSTOP) so that a recovery waits on it; always resumed."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.pid = daemon.proc.pid

    def freeze(self) -> None:
        """Stop the daemon."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let it run again."""
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> Frozen:
        self.freeze()
        return self

    def __exit__(self, *_: object) -> None:
        self.thaw()


def kill_and_wait(pid: int) -> None:
    """SIGKILL a worker and wait until it is gone (reaped or a zombie)."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid))


# --- 1. recovery on the next call, by default ----------------------------------------


def test_a_call_after_the_worker_died_recovers_by_default(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Without ``wait``, the next call reopens the proxy, replays its setup and goes through.

    From the second crash in a row the daemon restarts after a backoff
    (initial_delay): the call waits for that too. The daemon is told of each
    replay and publishes the proxy invalid, then valid again, every time.
    The policy says every crash counts and a standby waits out the backoff too
    (the defaults would promote it at once).
    """
    config = write_config(
        tmp_path,
        FAULTY,
        modules='[modules.faulty]\n[modules.faulty.restart]\ninitial_delay = "300ms"\n'
        'served_after = "1h"\npromote_at_once = false\n',
    )
    daemon = start_daemon(config)
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 9}})

    def changes(reason: str) -> list[dict[str, Any]]:
        records = daemon.events("proxy.state_changed")
        return [r for r in records if r.get("reason") == reason]

    def recovered_on(pid: int, record: dict[str, Any]) -> bool:
        return record.get("reason") == "recovered" and record.get("worker_pid") == pid

    killed: list[int] = []
    served: list[int] = []
    for round_ in range(1, 4):
        pid = client.call(faulty, "pid")
        kill_and_wait(pid)
        killed.append(pid)
        assert client.call(faulty, "get") == 9  # init(value=9) replayed on the new worker
        served.append(client.call(faulty, "pid"))
        assert served[-1] != pid
        assert client.attr(faulty, "recoveries") == round_
        # The client sends PROXY_READY without waiting for its answer, and the
        # daemon never marks a proxy valid on a dead worker: killed before the
        # daemon read it, the worker would take this round's "recovered" with it
        # (and the next death would find the proxy invalid already). So the next
        # kill waits for it; the log is read in a thread and may lag, too.
        daemon.wait_for("proxy.state_changed", functools.partial(recovered_on, served[-1]))
    assert client.attr(faulty, "valid")
    assert proxy_losses(daemon) == []
    invalid = changes("worker exited with signal SIGKILL")
    assert [r["worker_pid"] for r in invalid] == killed
    recovered = changes("recovered")
    assert [r["worker_pid"] for r in recovered] == served
    assert [r["replayed"] for r in recovered] == [1, 1, 1]  # the daemon was told each replay
    backoffs = [r for r in daemon.events("module.backoff") if r["module"] == "faulty"]
    assert backoffs, "no restart waited for its backoff"


def test_a_call_in_flight_when_the_worker_dies_fails_and_the_next_recovers(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """The call that was running fails with WorkerCrashed (it may have run); the next one works."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 4}})
    pid = client.call(faulty, "pid")
    with pytest.raises(ipc.WorkerCrashed) as crashed:
        client.call(faulty, "crash", {"signum": int(signal.SIGKILL)})
    assert not isinstance(crashed.value, ipc.CallNotSent)  # it was sent: it may have run
    assert client.call(faulty, "get") == 4
    assert client.call(faulty, "pid") != pid


def test_a_call_the_dying_worker_never_read_is_sent_again(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A call sent just after the SIGKILL, before the worker is gone, never ran: it goes through.

    It either finds the channel closed, or the worker dies with it unread
    (ECONNRESET): either way it is sent again on the recovered proxy.
    """
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 6}})
    for round_ in range(1, 4):
        os.kill(client.call(faulty, "pid"), signal.SIGKILL)  # no wait for it to be gone
        assert client.call(faulty, "get") == 6
        assert client.attr(faulty, "recoveries") == round_


def test_wait_still_bounds_the_recovery(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """``wait`` bounds how long a call waits for the recovery: CallNotSent when it runs out."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 3}})
    pid = client.call(faulty, "pid")
    with Frozen(daemon):
        kill_and_wait(pid)
        with pytest.raises(ipc.CallNotSent, match=r"did not recover within 0\.05s"):
            client.call(faulty, "get", wait=0.05)
    assert client.call(faulty, "get", wait=WAIT) == 3


@pytest.mark.parametrize("isolation", ["module", "proxy"])
def test_a_replay_that_failed_is_tried_again_on_a_new_instance(
    start_daemon: Start, tmp_path: Path, connect: Connect, isolation: str
) -> None:
    """A setup call that raises on replay fails the call; once it would pass, the proxy recovers.

    The client closes the channel whose replay failed; the daemon keeps the
    invalid proxy (it does not take that for the client leaving), so the next
    reopen gets a fresh instance and the replay runs there in full: with
    isolation per proxy, in a new worker of its own.
    """
    module = f'[modules.faulty]\nisolation = "{isolation}"\n'
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules=module))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    marker = tmp_path / "marker"
    assert client.call(faulty, "arm", {"marker": str(marker)}) == "armed"
    client.call(faulty, "init", {"settings": {"value": 5}})
    marker.touch()
    kill_and_wait(client.call(faulty, "pid"))
    with pytest.raises(ipc.CallNotSent, match=r"replaying its setup failed: .*marker present"):
        client.call(faulty, "get", timeout=WAIT)
    assert client.attr(faulty, "state") == "invalid"
    marker.unlink()
    assert client.call(faulty, "get", timeout=WAIT, wait=WAIT) == 5  # init replayed after arm
    assert client.attr(faulty, "state") == "valid"
    assert client.attr(faulty, "recoveries") == 1
    assert proxy_losses(daemon) == []
    closed = [r for r in daemon.events("proxy.state_changed") if r.get("state") == "closed"]
    assert closed == []
    client.release(faulty)
    assert proxies_held(daemon) == 0


# --- 2. never lost to a timeout -------------------------------------------------------


@pytest.mark.parametrize("bound", ["timeout", "wait"])
def test_a_grant_that_comes_after_the_caller_gave_up_is_kept(
    start_daemon: Start, tmp_path: Path, connect: Connect, bound: str
) -> None:
    """Calls that give up while the daemon is slow to reopen raise ipad errors; the proxy lives."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    proxy_id = client.attr(faulty, "proxy_id")
    client.call(faulty, "init", {"settings": {"value": 11}})
    pid = client.call(faulty, "pid")
    with Frozen(daemon):  # REOPEN_PROXY waits in the daemon's socket
        kill_and_wait(pid)
        for _ in range(5):
            timeout, wait = (0.05, None) if bound == "timeout" else (None, 0.05)
            with pytest.raises(ipc.IpadError) as gave_up:
                client.call(faulty, "get", timeout=timeout, wait=wait)
            if bound == "timeout":
                assert isinstance(gave_up.value, ipc.TimedOut)
                assert isinstance(gave_up.value, TimeoutError)
            else:
                assert isinstance(gave_up.value, ipc.CallNotSent)
    assert client.call(faulty, "get") == 11
    assert client.attr(faulty, "proxy_id") == proxy_id
    assert client.attr(faulty, "recoveries") == 1
    assert client.status().daemon["proxies"] == 1
    assert proxy_losses(daemon) == []
    closed = [r for r in daemon.events("proxy.state_changed") if r.get("state") == "closed"]
    assert closed == []


# --- 3. ipad errors only, with the reason ----------------------------------------------


def test_cooldown_without_fallback_fails_the_call_saying_so(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A module in cooldown fails the call with CallNotSent naming the crash and the cooldown."""
    config = write_config(
        tmp_path,
        FAULTY,
        modules="[modules.faulty]\n[modules.faulty.restart]\nmax_failures = 1\n"
        'cooldown_interval = "60s"\nstart_timeout = "3s"\nserved_after = "1h"\n',
    )
    daemon = start_daemon(config)
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    kill_and_wait(client.call(faulty, "pid"))  # one failure: restarted
    kill_and_wait(client.call(faulty, "pid", wait=WAIT))  # two: more than max_failures
    with pytest.raises(ipc.CallNotSent) as unavailable:
        client.call(faulty, "get")
    error = unavailable.value
    assert "cooldown" in error.message, error.message
    assert "SIGKILL" in error.message, error.message
    assert error.details["state"] == "cooldown"
    assert error.details["cooldown_interval"] == 60.0
    assert isinstance(error.__cause__, ipc.ModuleUnavailable)
    assert module_status(daemon, "faulty")["state"] == "cooldown"
    assert client.status().daemon["proxies"] == 1  # still held: it recovers once the module runs


def test_cooldown_with_a_fallback_serves_the_call_there(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """In cooldown, the default call recovers onto the fallback, its setup replayed, and says so."""
    config = write_config(
        tmp_path,
        FAULTY,
        modules='[modules.faulty]\nfallback = "steady"\n[modules.faulty.restart]\n'
        'max_failures = 1\ncooldown_interval = "60s"\nserved_after = "1h"\n[modules.steady]\n',
    )
    daemon = start_daemon(config)
    steady = daemon.worker_pids()["steady"]
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 21}})
    kill_and_wait(client.call(faulty, "pid"))  # one failure: restarted
    kill_and_wait(client.call(faulty, "pid", wait=WAIT))  # two: cooldown, the fallback serves
    assert client.call(faulty, "pid") == steady
    assert client.call(faulty, "get") == 21
    assert client.attr(faulty, "info").served_by == "steady"


# --- 4. the caller's deadline holds across the whole call -----------------------------

TICKER_MANIFEST = """\
name = "ticker"
version = "1.0.0"
api_version = 1
worker = "ipad-worker"
entry_point = "ipad_test_ticker:Ticker"
description = "sends an event now and then while a call runs (tests)"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

TICKER_SOURCE = '''\
"""Events that trickle in while a call runs: they must not stretch the caller's deadline."""

import os
import time

from ipad.ipa import IPAModule

__version__ = "1.0.0"


class Ticker(IPAModule):
    """One method that takes long and says so now and then."""

    def tick(self, count: int, interval: float) -> int:
        """Send ``count`` events, ``interval`` seconds apart, then return ``count``."""
        for n in range(count):
            self.context.emit("tick", {"n": n})
            time.sleep(interval)
        return count

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()
'''


def ticker_daemon(start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]) -> DaemonProcess:
    """A daemon whose one module, ``ticker``, sends events while its call runs."""
    modules = tmp_path / "ticker-modules"
    (modules / "ipad_test_ticker").mkdir(parents=True)
    (modules / "ticker.toml").write_text(TICKER_MANIFEST)
    (modules / "ipad_test_ticker" / "__init__.py").write_text(TICKER_SOURCE)
    tuning = tmp_path / "ticker-tuning.toml"
    tuning.write_text("")
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{modules}"]\n',
        modules='[modules.ticker]\n[modules.ticker.restart]\nheartbeat_timeout = "60s"\n',
    )
    return start_daemon(config, env={**daemon_env, "IPAD_TICKER_TUNING_FILE": str(tuning)})


def test_events_that_trickle_in_do_not_stretch_the_deadline(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], connect: Connect
) -> None:
    """A call whose worker sends an event every 0.3 s still times out: TimedOut, an ipad error."""
    daemon = ticker_daemon(start_daemon, tmp_path, daemon_env)
    client = connect(daemon.socket)
    ticker = client.request_proxy("ticker")
    assert client.call(ticker, "tick", {"count": 2, "interval": 0.01}) == 2
    # Endless for this test: before the fix, the call never returned (the test timed out).
    with pytest.raises(ipc.TimedOut):
        client.call(ticker, "tick", {"count": 100_000, "interval": 0.3}, timeout=1.0)


def test_the_deadline_covers_the_recovery_and_the_replay(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A timeout given to a call on a dead proxy bounds the recovery too, not each receive."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 5}})
    pid = client.call(faulty, "pid")
    with Frozen(daemon):
        kill_and_wait(pid)
        # Before the fix: the blocking client waited a fresh timeout per packet (or wait).
        with pytest.raises(ipc.TimedOut):
            client.call(faulty, "get", timeout=0.2, wait=60)
    assert client.call(faulty, "get", timeout=WAIT) == 5


# --- 6. one reconnect loop, with backoff -----------------------------------------------


def attempts_bound(seconds: float) -> int:
    """The most connection attempts one loop with the client's backoff makes in ``seconds``.

    Jitter only lengthens the delays, so the bound uses the delays without it.
    """
    attempts, spent, delay = 1, 0.0, RECONNECT_INITIAL
    while spent + delay <= seconds:
        spent += delay
        attempts += 1
        delay = min(delay * 2, RECONNECT_MAX)
    return attempts


def test_a_refusing_daemon_sees_one_reconnect_loop(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], connect: Connect
) -> None:
    """Refused at connect (max_connections_per_user), the client retries with backoff, once."""
    limited = "[clients]\nmax_connections_per_user = 1\n"
    first = start_daemon(write_config(tmp_path, limited, modules="[modules.echo]\n"))
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second_env = {**daemon_env, "IPAD_SOCKET": str(second_dir / "run" / "ipad.sock")}
    second = start_daemon(
        write_config(second_dir, limited, modules="[modules.echo]\n"), env=second_env
    )
    # The client reaches "the daemon" through a link the test turns to the second one.
    link = tmp_path / "ipad.sock"
    link.symlink_to(first.socket)
    client = connect(link, reconnect=True)
    echo = client.request_proxy("echo")
    first_pid = client.call(echo, "pid")
    holder = ipc.BlockingClient(second.socket)  # the one connection the second daemon allows
    try:
        turned = tmp_path / "turned.sock"
        turned.symlink_to(second.socket)
        turned.replace(link)
        started = time.monotonic()
        first.expect_unclean_exit("killed on purpose: the client must find another daemon")
        first.proc.kill()
        first.proc.wait(timeout=WAIT)
        tasks: list[int] = []
        while time.monotonic() - started < 3.0:
            with contextlib.suppress(ipc.IpadError):  # refused: the client says so and goes on
                client.call(echo, "pid", timeout=0.2)
            tasks.append(client.tasks())
            time.sleep(0.01)  # an application calling now and then, not spinning
        refused = int(holder.status().daemon["clients_refused"])
        elapsed = time.monotonic() - started
        assert 2 <= refused <= attempts_bound(elapsed), (refused, elapsed)
        assert max(tasks) <= 8, tasks
        reasons = {r["reason"] for r in second.events("client.refused")}
        per_user = "1 at once per user (clients.max_connections_per_user)"
        assert reasons == {f"too many connections from uid 0: {per_user}"}
    finally:
        holder.close()
    assert client.call(echo, "pid", wait=WAIT) != first_pid
    assert client.status().daemon["pid"] == second.proc.pid


# --- 7. as a camera application would ----------------------------------------------------


@pytest.mark.parametrize("wait", [None, 0.03])
def test_awb_at_30_frames_a_second_survives_ten_kills(
    start_daemon: Start, tmp_path: Path, connect: Connect, wait: float | None
) -> None:
    """The awb worker SIGKILLed 10 times under 30 frames/s: every frame after a recovery succeeds."""
    config = write_config(
        tmp_path,
        modules="[modules.awb]\n[modules.awb.restart]\nmax_failures = 100\n"
        'stable_after = "100ms"\n',
    )
    daemon = start_daemon(config)
    client = connect(daemon.socket)
    awb = client.request_proxy("awb", pipeline="rkisp1", pipeline_version=1)
    client.call(awb, "init")
    proxy_id = client.attr(awb, "proxy_id")
    periods: list[list[str]] = []  # per kill, each frame's outcome: "ok" or the error's class
    frame = 0
    for _ in range(11):  # the frames before each kill, and after the last
        outcomes: list[str] = []
        periods.append(outcomes)
        next_frame = time.monotonic()
        while len(outcomes) < 15 or outcomes[-1] != "ok":
            frame += 1
            next_frame += 1 / 30
            time.sleep(max(0.0, next_frame - time.monotonic()))
            fd = write_memfd(STATS)
            try:
                result = client.call(
                    awb, "process_stats", {"frame": frame}, {"stats": fd}, timeout=5, wait=wait
                )
            except ipc.IpadError as exc:
                outcomes.append(type(exc).__name__)
            else:
                assert result["frame"] == frame
                outcomes.append("ok")
            finally:
                os.close(fd)
            assert len(outcomes) < 1000, outcomes
        if len(periods) <= 10:
            kill_and_wait(client.status().modules["awb"]["worker_pid"])
    for outcomes in periods:
        first_ok = outcomes.index("ok")
        assert set(outcomes[:first_ok]) <= {"WorkerCrashed", "CallNotSent", "TimedOut"}, outcomes
        assert set(outcomes[first_ok:]) == {"ok"}, outcomes  # every frame after the recovery
    assert client.attr(awb, "proxy_id") == proxy_id
    assert client.attr(awb, "recoveries") == 10
    assert client.status().daemon["proxies"] == 1
    assert proxy_losses(daemon) == []


# --- disconnecting mid-operation ---------------------------------------------------------


def test_a_client_closed_while_its_recovery_waits_leaves_nothing_behind(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Closed with a reopen still unanswered, the client closes at once and the daemon frees all."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    client = connect(daemon.socket)
    faulty = client.request_proxy("faulty")
    pid = client.call(faulty, "pid")
    with Frozen(daemon):
        kill_and_wait(pid)
        with pytest.raises(ipc.TimedOut):
            client.call(faulty, "get", timeout=0.05)
        client.close()
    daemon.wait_for("client.disconnected", lambda r: r["reason"] == "client closed the connection")
    wait_until(lambda: proxies_held(daemon) == 0)
    assert daemon.proc.poll() is None


async def test_trio_client_left_while_a_call_waits_for_the_recovery(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Leaving ``open_client`` while a call waits for its proxy's recovery ends it at once."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    outcome: list[BaseException] = []
    frozen = Frozen(daemon)
    try:
        with trio.fail_after(WAIT):
            async with ipc.open_client(daemon.socket) as client:
                faulty = await client.request_proxy("faulty")
                pid = await faulty.call("pid")
                frozen.freeze()  # the reopen waits, unanswered, until after the client left
                await trio.to_thread.run_sync(kill_and_wait, pid)
                waiting = trio.Event()

                async def caller() -> None:
                    waiting.set()
                    try:
                        await faulty.call("get")
                    except BaseException as exc:
                        outcome.append(exc)
                        raise

                client.nursery.start_soon(caller)
                await waiting.wait()
                await trio.sleep(0.05)
    finally:
        frozen.thaw()
    assert [type(e) for e in outcome] == [trio.Cancelled]
    daemon.wait_for("client.disconnected", lambda r: r["reason"] == "client closed the connection")
    wait_until(lambda: proxies_held(daemon) == 0)


# --- 5. every channel the trio client receives is closed, whatever overtakes its grant ------


class HeldGrant:
    """Holds a reopen's grant in the trio client between its arrival and its adoption.

    On a busy machine the grant's reply and the client's close (or the
    proxy's release) can come in one scheduler pass: the recovery then carries
    on after them. This opens that window on purpose, and keeps the channel
    to check it was closed.
    """

    def __init__(self, client: ipc.Client) -> None:
        self.grant = client._grant
        self.channels: list[Any] = []
        self.arrived = trio.Event()
        self.go = trio.Event()
        client._grant = self._held  # type: ignore[method-assign]

    async def _held(self, message: Any) -> Any:
        granted = await self.grant(message)
        self.channels.append(granted[1])
        self.arrived.set()
        with trio.CancelScope(shield=True):  # what overtakes it must not cancel it
            await self.go.wait()
        return granted


async def echo_with_its_reopen_held(client: ipc.Client) -> tuple[ipc.Proxy, HeldGrant]:
    """An echo proxy whose worker was killed, the grant of its reopen held as it arrives."""
    echo = await client.request_proxy("echo")
    held = HeldGrant(client)
    await trio.to_thread.run_sync(kill_and_wait, await echo.call("pid"))
    await held.arrived.wait()
    return echo, held


async def test_a_channel_granted_as_the_trio_client_closes_is_closed(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A reopen's channel that arrives as the client closes is closed with it, not left open."""
    daemon = start_daemon(write_config(tmp_path, modules="[modules.echo]\n"))
    with trio.fail_after(WAIT):
        async with ipc.open_client(daemon.socket) as client:
            echo, held = await echo_with_its_reopen_held(client)
            client.nursery.start_soon(_release_after_close, client, held)
    [channel] = held.channels
    assert channel.raw.fileno() == -1
    assert echo.state != "valid"


async def _release_after_close(client: ipc.Client, held: HeldGrant) -> None:
    """Let the held grant go once the client has closed (its nursery is cancelled by then)."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + WAIT):  # bounded all the same
        while not client._closing:
            await trio.sleep(0.001)
    held.go.set()


async def test_a_channel_granted_as_its_proxy_is_released_is_closed(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A reopen's grant that arrives after its proxy was released is closed; the client lives on."""
    daemon = start_daemon(write_config(tmp_path, modules="[modules.echo]\n"))
    with trio.fail_after(WAIT):
        async with ipc.open_client(daemon.socket) as client:
            echo, held = await echo_with_its_reopen_held(client)
            await echo.release()
            held.go.set()
            [channel] = held.channels
            with trio.fail_after(WAIT):
                while channel.raw.fileno() != -1:
                    await trio.sleep(0.01)
            assert echo.state == "closed"
            other = await client.request_proxy("echo")
            assert (await other.call("echo", {"text": "on"}))["text"] == "on"
    wait_until(lambda: proxies_held(daemon) == 0)


class HeldRequest:
    """Holds the trio client's REQUEST_PROXY for one module until ``go``: that proxy stays away.

    After a reconnection the proxies come back in whatever order their requests
    run; holding one back lets the test give its old id to another on the new
    daemon (which numbers proxies afresh) and release it before it is back.
    """

    def __init__(self, client: ipc.Client, module: str) -> None:
        self.grant = client._grant
        self.module = module
        self.waiting = trio.Event()
        self.go = trio.Event()
        self.granted = trio.Event()
        client._grant = self._held  # type: ignore[method-assign]

    async def _held(self, message: Any) -> Any:
        if getattr(message, "module", None) != self.module or self.granted.is_set():
            return await self.grant(message)
        self.waiting.set()
        await self.go.wait()
        try:
            return await self.grant(message)
        finally:
            self.granted.set()


async def test_a_proxy_released_before_a_reconnection_brought_it_back_releases_only_itself(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Released while not yet back on a restarted daemon, a proxy frees nothing of another's.

    Its old id is another proxy's new one there: no RELEASE_PROXY goes out with
    it, and the grant its request gets afterwards is given back at once.
    """
    config = write_config(tmp_path, FAULTY, modules="[modules.echo]\n[modules.faulty]\n")
    first = start_daemon(config)
    with trio.fail_after(2 * WAIT):
        async with ipc.open_client(first.socket, reconnect=True) as client:
            faulty = await client.request_proxy("faulty")
            echo = await client.request_proxy("echo")
            old_id = faulty.proxy_id
            held = HeldRequest(client, "faulty")
            first.expect_unclean_exit(
                "SIGKILLed on purpose: a release across a reconnect is tested"
            )
            first.proc.kill()
            await trio.to_thread.run_sync(functools.partial(first.proc.wait, timeout=WAIT))
            second = await trio.to_thread.run_sync(start_daemon, config)
            await held.waiting.wait()
            assert (await echo.call("echo", {"text": "back"}, wait=WAIT))["text"] == "back"
            assert echo.proxy_id == old_id  # the new daemon gave echo faulty's old number
            await faulty.release()
            held.go.set()
            await held.granted.wait()
            assert (await echo.call("echo", {"text": "still"}))["text"] == "still"
            assert echo.state == "valid"
            assert client.proxies == {echo.proxy_id: echo}
            while (await client.status()).daemon["proxies"] != 1:  # the late grant given back
                await trio.sleep(0.01)
            assert faulty.state == "closed"
            assert (await client.status()).daemon["pid"] == second.proc.pid
    wait_until(lambda: proxies_held(second) == 0)
    second.wait_for("proxy.state_changed", lambda r: r.get("state") == "closed")  # the log lags
    closed = [r for r in second.events("proxy.state_changed") if r.get("state") == "closed"]
    assert next((r["module"], r["reason"]) for r in closed) == ("faulty", "released")


def test_a_blocking_proxy_released_before_it_is_back_releases_only_itself(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The blocking client's side of the same: a proxy not yet back sends no RELEASE_PROXY.

    It brings a proxy back at its next call, so one never called since the
    restart keeps the old daemon's id, which the test lets another take.
    """
    config = write_config(tmp_path, FAULTY, modules="[modules.echo]\n[modules.faulty]\n")
    first = start_daemon(config)
    client = ipc.BlockingClient(first.socket, reconnect=True)
    try:
        faulty = client.request_proxy("faulty")
        echo = client.request_proxy("echo")
        old_id = faulty.proxy_id
        first.expect_unclean_exit("SIGKILLed on purpose: a release across a reconnect is tested")
        first.proc.kill()
        first.proc.wait(timeout=WAIT)
        second = start_daemon(config)
        assert echo.call("echo", {"text": "back"}, wait=WAIT)["text"] == "back"
        assert echo.proxy_id == old_id  # the new daemon gave echo faulty's old number
        faulty.release()
        assert echo.call("echo", {"text": "still"})["text"] == "still"
        assert echo.state == "valid"
        assert client.proxies == {echo.proxy_id: echo}
        assert client.status().daemon["proxies"] == 1
        assert faulty.state == "closed"
    finally:
        client.close()
    wait_until(lambda: proxies_held(second) == 0)
    second.wait_for("proxy.state_changed", lambda r: r.get("state") == "closed")  # the log lags
    closed = [r for r in second.events("proxy.state_changed") if r.get("state") == "closed"]
    assert [r["module"] for r in closed] == ["echo"]  # at the close only
