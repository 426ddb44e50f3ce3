"""Clients survive a daemon restart: they reconnect, get their proxies again and replay setup."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.client._trio import LocalEvent
from tests.daemon_process import TEST_MODULES, DaemonProcess, write_config

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]

#: The test module whose init(settings={"value": N}) a later get() returns.
FAULTY = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'


async def next_local(client: ipc.Client, kind: str, timeout: float = 30) -> LocalEvent:
    """The next event of ``kind`` the client library made itself."""
    with trio.fail_after(timeout):
        async for event in client.events:
            if isinstance(event, LocalEvent) and event.kind == kind:
                return event
    raise AssertionError(f"the event stream ended before a {kind!r} event")


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_trio_client_carries_on_across_a_daemon_restart(
    start_daemon: Start, tmp_path: Path, how: str
) -> None:
    """After the daemon is killed (or stopped) and started again, the same proxy works again."""
    config = write_config(tmp_path, FAULTY, modules="[modules.echo]\n[modules.faulty]\n")
    first = start_daemon(config)
    async with ipc.open_client(first.socket, reconnect=True) as client:
        faulty = await client.request_proxy("faulty")
        await faulty.call("init", {"settings": {"value": 17}})
        echo = await client.request_proxy("echo")
        old_pid = await echo.call("pid")
        if how == "sigkill":
            first.expect_unclean_exit("SIGKILLed on purpose: the client's reconnect is tested")
            first.proc.kill()
            first.proc.wait(timeout=30)
        else:
            assert first.stop() == 0
        lost = await next_local(client, "disconnected")
        assert lost.details["reason"]
        assert echo.state == "invalid"
        with pytest.raises(ipc.CallNotSent, match="cannot reach the daemon"):
            await echo.call("pid")  # without wait: the next reconnection attempt fails
        second = start_daemon(config)
        back = await next_local(client, "reconnected")
        assert back.details["daemon_pid"] == second.proc.pid
        assert await echo.call("pid", wait=30) != old_pid
        assert await faulty.call("get", wait=30) == 17  # init(value=17) was replayed
        assert echo.state == "valid"
        # Under its new id only (the new daemon numbers proxies afresh: the new id
        # may be the old one, when the proxies are requested again in the same order).
        assert [pid for pid, proxy in client.proxies.items() if proxy is echo] == [echo.proxy_id]
        status = await client.status()
        assert status.daemon["pid"] == second.proc.pid
        assert status.modules["faulty"]["proxies"] == 1
    # Waited for, not just counted: under load the log's reader thread may lag behind.
    second.wait_for("proxy.granted", lambda r: r["module"] == "faulty")
    second.wait_for("proxy.granted", lambda r: r["module"] == "echo")
    recovered = [r for r in second.events("proxy.granted") if r["module"] in ("faulty", "echo")]
    assert len(recovered) == 2


async def test_without_reconnect_the_loss_is_final(start_daemon: Start) -> None:
    """The default client ends its event stream and fails calls with Disconnected."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        daemon.expect_unclean_exit("SIGKILLed on purpose: the client's loss is tested")
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)
        seen: list[Any] = []
        with trio.fail_after(30):
            async for event in client.events:
                seen.append(event)
        assert not any(isinstance(e, LocalEvent) and e.kind == "reconnected" for e in seen)
        with pytest.raises((ipc.Disconnected, ipc.WorkerCrashed)):
            await echo.call("pid", wait=1)
        with pytest.raises(ipc.Disconnected):
            await client.status()


def test_blocking_client_reconnects_when_asked_to_wait(start_daemon: Start, tmp_path: Path) -> None:
    """A blocking proxy's call reconnects to the new daemon and replays setup; ``wait`` waits."""
    config = write_config(tmp_path, FAULTY, modules="[modules.faulty]\n")
    first = start_daemon(config)
    with BlockingClient(first.socket, reconnect=True) as client:
        faulty = client.request_proxy("faulty")
        faulty.call("init", {"settings": {"value": 13}})
        first.expect_unclean_exit("SIGKILLed on purpose: the client's reconnect is tested")
        first.proc.kill()
        first.proc.wait(timeout=30)
        with pytest.raises(ipc.CallNotSent, match="cannot reach the daemon"):
            faulty.call("get")  # the call makes one attempt itself
        second = start_daemon(config)
        assert faulty.call("get", wait=30) == 13
        assert faulty.recoveries == 1
        assert client.status().daemon["pid"] == second.proc.pid
        assert client.proxies[faulty.proxy_id] is faulty
