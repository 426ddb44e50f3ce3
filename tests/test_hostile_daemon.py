"""What a worker controls cannot make the daemon fail others: sizes, strings, floods, output.

Each test runs a real daemon with a hostile module next to a well-behaved one
and proves from the outside that the attack failed and that everyone else
carried on: ``ipadctl status`` answers (about as fast as before the attack),
another module's calls answer, subscribed clients keep receiving events, the
daemon's descriptors come back to their baseline, and it stops cleanly with
SIGTERM at the end (the ``start_daemon`` fixture's own check).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ipad import _protocol as p
from ipad import client as ipc
from ipad.client import BlockingClient
from tests.daemon_process import DaemonProcess, open_fds, wait_until, write_config

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]

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
