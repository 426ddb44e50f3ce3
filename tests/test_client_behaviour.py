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
from tests.daemon_process import WAIT, wait_until, write_config

__all__ = ["connect"]  # the fixture, used by every test here

pytestmark = pytest.mark.timeout(120)

ECHO = "[modules.echo]\n"


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
    """After release the daemon holds no proxy and a call fails with CallNotSent (closed)."""
    daemon, client, echo, _ = echo_proxy(start_daemon, tmp_path, connect)
    client.release(echo)
    assert client.attr(echo, "state") == "closed"
    wait_until(lambda: proxies_held(daemon) == 0)
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
    """SIGKILLed during a call: the call ends with an ipad error, and requests say Disconnected."""
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
    with pytest.raises(ipc.Disconnected):
        client.status()
