"""What both clients do alike on the everyday paths, one test body run against each.

The drivers are in tests/client_drivers.py; these tests use a real daemon
and real workers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from ipad import client as ipc
from ipad.client._backlog import EVENT_BACKLOG
from tests.client_drivers import Connect, Start, connect, proxies_held
from tests.daemon_process import TEST_MODULES, WAIT, wait_until, write_config

__all__ = ["connect"]  # the fixture, used by every test here

pytestmark = pytest.mark.timeout(120)

ECHO = "[modules.echo]\n"

#: The test module whose init(settings={"value": N}) a later get() returns.
FAULTY = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'


def echo_proxy(start_daemon: Start, tmp_path: Path, connect: Connect) -> tuple[Any, ...]:
    """A daemon serving the echo module, a client of it and a proxy to echo, called once."""
    daemon = start_daemon(write_config(tmp_path, modules=ECHO))
    client = connect(daemon.socket)
    echo = client.request_proxy("echo")
    return daemon, client, echo, client.call(echo, "pid")


def test_call_reply_and_the_daemons_errors(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A call returns the module's reply; an unknown method, module or failing call raise ipad errors."""
    _daemon, client, echo, _ = echo_proxy(start_daemon, tmp_path, connect)
    assert client.call(echo, "echo", {"text": "hi"})["text"] == "hi"
    with pytest.raises(ipc.UnknownMethod):
        client.call(echo, "no_such_method")
    with pytest.raises(ipc.ModuleError, match="on purpose"):
        client.call(echo, "fail", {"message": "on purpose"})
    with pytest.raises(ipc.UnknownModule):
        client.request_proxy("no_such_module")
    assert client.attr(echo, "valid")
    assert client.call(echo, "echo", {"text": "still"})["text"] == "still"


def test_a_call_timeout_leaves_the_proxy_valid(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """TimedOut (sent) for a slow call; the proxy stays valid, and its late reply is dropped."""
    _daemon, client, echo, pid = echo_proxy(start_daemon, tmp_path, connect)
    with pytest.raises(ipc.TimedOut) as timed_out:
        client.call(echo, "sleep", {"seconds": 0.5}, timeout=0.1)
    assert timed_out.value.details["sent"] is True
    assert client.attr(echo, "valid")
    assert client.call(echo, "echo", {"text": "next"})["text"] == "next"  # not the late reply
    assert client.call(echo, "pid") == pid  # the same worker: nothing was recovered
    assert client.attr(echo, "recoveries") == 0


def test_release_frees_the_instance_and_closes_the_proxy(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """After release the daemon holds no proxy and a call fails with CallNotSent (closed).

    The daemon closes each for its RELEASE_PROXY ("released"), which it then
    answers without an error: the client sends it before closing the channel
    (else the channel's end would often close the proxy first). Several
    proxies, so that such a race would show.
    """
    daemon, client, echo, _ = echo_proxy(start_daemon, tmp_path, connect)
    others = [client.request_proxy("echo") for _ in range(3)]
    proxy_ids = [client.attr(proxy, "proxy_id") for proxy in [echo, *others]]
    for proxy in [*others, echo]:
        client.release(proxy)
    assert client.attr(echo, "state") == "closed"
    wait_until(lambda: proxies_held(daemon) == 0)
    # ipadctl connected after the releases were answered: its end is logged after them.
    wait_until(lambda: bool(daemon.events("client.disconnected")))
    changes = daemon.events("proxy.state_changed")
    ends = {r.get("proxy_id"): r.get("reason") for r in changes if r.get("state") == "closed"}
    assert ends == dict.fromkeys(proxy_ids, "released")
    assert daemon.events("request.failed") == []
    with pytest.raises(ipc.CallNotSent) as closed:
        client.call(echo, "pid", timeout=WAIT)
    assert closed.value.details.get("closed") is True


def test_module_events_are_delivered_and_bounded(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Events nobody reads are kept up to EVENT_BACKLOG; the older ones are dropped and counted."""
    _daemon, client, echo, _ = echo_proxy(start_daemon, tmp_path, connect)
    extra = 20
    for n in range(EVENT_BACKLOG + extra):
        client.call(echo, "emit", {"name": "tick", "data": {"n": n}})
    client.call(echo, "pid")  # every event came before this reply, on the same channel
    assert client.events_lost(echo) == extra


def test_a_daemon_killed_mid_call_fails_the_call_and_later_requests(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """SIGKILLed during a call: the call fails, and so does everything after; nothing reconnects."""
    daemon, client, echo, _ = echo_proxy(start_daemon, tmp_path, connect)
    daemon.expect_unclean_exit("SIGKILLed on purpose: a client's loss mid-call is tested")
    killer = threading.Timer(0.2, daemon.proc.kill)
    killer.start()
    try:
        with pytest.raises(ipc.IpadError):
            client.call(echo, "sleep", {"seconds": 3.0}, timeout=WAIT)
    finally:
        killer.join()
    daemon.proc.wait(timeout=WAIT)
    # Without ``reconnect`` the loss is final: the event stream ends, nothing reconnects.
    seen = client.events_until_lost()
    assert not any(getattr(e, "kind", None) == "reconnected" for e in seen)
    with pytest.raises((ipc.Disconnected, ipc.WorkerCrashed)):
        client.call(echo, "pid", wait=1)
    with pytest.raises(ipc.Disconnected):
        client.status()


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_client_carries_on_across_a_daemon_restart(
    start_daemon: Start, tmp_path: Path, connect: Connect, how: str
) -> None:
    """With ``reconnect``, the same proxies work on a restarted daemon, their setup replayed."""
    config = write_config(tmp_path, FAULTY, modules="[modules.echo]\n[modules.faulty]\n")
    first = start_daemon(config)
    client = connect(first.socket, reconnect=True)
    faulty = client.request_proxy("faulty")
    client.call(faulty, "init", {"settings": {"value": 17}})
    echo = client.request_proxy("echo")
    old_pid = client.call(echo, "pid")
    if how == "sigkill":
        first.expect_unclean_exit("SIGKILLed on purpose: the client's reconnect is tested")
        first.proc.kill()
        first.proc.wait(timeout=WAIT)
    else:
        assert first.stop() == 0
    lost = client.local_event("disconnected")  # the trio client says so; the blocking one cannot
    assert lost is None or lost["reason"]
    with pytest.raises(ipc.CallNotSent, match="cannot reach the daemon"):
        client.call(echo, "pid")  # without wait: the reconnection's one attempt fails
    assert client.attr(echo, "state") == "invalid"
    second = start_daemon(config)
    back = client.local_event("reconnected")
    assert back is None or back["daemon_pid"] == second.proc.pid
    assert client.call(echo, "pid", wait=WAIT) != old_pid
    assert client.call(faulty, "get", wait=WAIT) == 17  # init(value=17) was replayed
    assert client.attr(echo, "state") == "valid"
    assert client.attr(faulty, "recoveries") == 1
    # Each under its new id only (the new daemon numbers proxies afresh: in another
    # order, echo's new id is faulty's old one).
    proxies = dict(client.attr(client.client, "proxies"))
    assert proxies == {client.attr(echo, "proxy_id"): echo, client.attr(faulty, "proxy_id"): faulty}
    status = client.status()
    assert status.daemon["pid"] == second.proc.pid
    assert status.modules["faulty"]["proxies"] == 1
    client.close()
    # Waited for, not just counted: under load the log's reader thread may lag behind.
    second.wait_for("proxy.granted", lambda r: r["module"] == "faulty")
    second.wait_for("proxy.granted", lambda r: r["module"] == "echo")
    granted = [r for r in second.events("proxy.granted") if r["module"] in ("faulty", "echo")]
    assert len(granted) == 2  # each requested anew once
