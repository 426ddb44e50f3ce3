"""Load with faults: 200 clients call their own proxies while workers, or the daemon, are killed.

The scenario is bench/bench_load.py's, shorter: every call carries a token of
its own that the echo module sends back, so a reply that reaches any caller
but the one that sent it is counted as misrouted.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from bench_load import Tally, module_names, run_load, write_config

from ipad.client._trio import Client
from ipad.protocol.errors import Disconnected
from tests.daemon_process import DaemonProcess, fd_targets, open_fds, wait_until

pytestmark = pytest.mark.timeout(240)

Start = Callable[..., DaemonProcess]

#: Clear errors a call may fail with: in flight when its worker died (it may have run, so it
#: is not sent again), or, across a daemon restart, while the connection was being made again.
CLEAR_FAILURES = {"WorkerCrashed", "Disconnected"}


def load_daemon(start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str],
                clients: int) -> DaemonProcess:  # fmt: skip
    """A daemon with bench_load's configuration: four echo modules, room for the clients."""
    config, extra = write_config(tmp_path, 4, clients)
    return start_daemon(config, env={**daemon_env, **extra})


async def proxies_held(admin: Client) -> int:
    """How many proxies the daemon holds; 0 while the admin client is itself reconnecting."""
    try:
        status = await admin.status()
    except Disconnected:
        return 0
    return int(status.daemon["proxies"])


def assert_every_reply_went_to_its_caller(tally: Tally) -> None:
    """No reply was misrouted, none hung, and every failure was one of ipad's errors."""
    assert tally.misrouted == 0
    assert tally.unclear == []
    assert set(tally.failures) <= CLEAR_FAILURES, tally.failures
    assert tally.calls > 1000


def report(what: str, tally: Tally, extra: str = "") -> None:
    """The run's figures, printed past pytest's capture (they go into bench/RESULTS.md)."""
    print(f"\n{what}: {tally.calls} calls in {tally.seconds:.1f}s "
          f"({tally.calls / tally.seconds:.0f}/s), failed {dict(tally.failures)}, misrouted "
          f"{tally.misrouted}, unclear {len(tally.unclear)}, kills {tally.kills}{extra}")  # fmt: skip


async def test_200_clients_while_workers_are_killed_at_random(
    start_daemon: Start,
    tmp_path: Path,
    daemon_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every reply reaches the caller that sent it; afterwards every proxy and fd is released."""
    daemon = load_daemon(start_daemon, tmp_path, daemon_env, 200)
    daemon.wait_standbys()
    baseline = open_fds(daemon.proc.pid)
    before = fd_targets(daemon.proc.pid)
    tally = await run_load(daemon.socket, daemon.proc.pid, clients=200, seconds=3.0,
                           kill_interval=0.3)  # fmt: skip
    with capsys.disabled():
        report("load", tally)
    assert_every_reply_went_to_its_caller(tally)
    assert tally.kills >= 4
    assert tally.failed < tally.calls / 10
    assert len(tally.last_answered) == 400  # every client's every caller was answered
    # The clients have left: their proxies and module instances are released.
    status = await trio.to_thread.run_sync(daemon.ctl, "--json", "status")
    assert '"proxies": 0' in status.stdout
    await trio.to_thread.run_sync(daemon.wait_standbys)
    try:
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: open_fds(daemon.proc.pid) == baseline))  # fmt: skip
    except AssertionError:
        after = fd_targets(daemon.proc.pid)
        added = sorted(set(after.items()) - set(before.items()))
        gone = sorted(set(before.items()) - set(after.items()))
        status = await trio.to_thread.run_sync(daemon.ctl, "--json", "status")
        raise AssertionError(f"fds added {added}, gone {gone}; status {status.stdout}") from None
    assert daemon.events("request.internal_error") == []
    assert daemon.events("client.session_failed") == []
    exited = {r["worker_pid"] for r in daemon.events("worker.exited")}
    assert len(exited) >= tally.kills


async def test_clients_carry_on_across_a_daemon_restart_under_load(
    start_daemon: Start,
    tmp_path: Path,
    daemon_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The daemon SIGKILLed and started again mid-load: every client reconnects and calls on."""
    first = load_daemon(start_daemon, tmp_path, daemon_env, 200)
    config = tmp_path / "config.toml"
    env = first.env
    restarted: dict[str, float] = {}

    async def restart_daemon(admin: Client, deadline: float, tally: Tally) -> None:
        await trio.sleep(1.0)
        first.expect_unclean_exit("SIGKILLed on purpose: the clients' recovery is tested")
        os.kill(first.proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(first.proc.wait)
        second = await trio.to_thread.run_sync(lambda: start_daemon(config, env=env))
        restarted["at"] = trio.current_time()
        restarted["pid"] = second.proc.pid
        # Every client is back once the new daemon holds all 200 proxies again.
        with trio.fail_after(60):
            while await proxies_held(admin) < 200:
                await trio.sleep(0.05)
        restarted["all_back"] = trio.current_time()
        assert restarted["all_back"] < deadline, "the clients took the whole run to come back"

    tally = await run_load(first.socket, first.proc.pid, clients=200, seconds=6.0,
                           fault=restart_daemon)  # fmt: skip
    with capsys.disabled():
        back = restarted["all_back"] - restarted["at"]
        report("restart", tally, f", all 200 proxies back {back:.2f}s after the new daemon started")
    assert_every_reply_went_to_its_caller(tally)
    # Each of the 400 callers had a call answered by the new daemon's workers.
    assert len(tally.last_answered) == 400
    late = {name: (at, tally.last_failure.get(name)) for name, at in tally.last_answered.items()
            if at <= restarted["all_back"]}  # fmt: skip
    assert late == {}, restarted
    assert set(module_names(4)) == {"echo", "echo2", "echo3", "echo4"}
