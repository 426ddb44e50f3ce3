"""Issue 19's parts together: registered buffers and descriptions on an isolated-per-proxy module.

Each part has its own tests; these prove they compose: a module with
``isolation = "proxy"`` describes itself (DESCRIBE and the grant), each proxy's
registered buffers live in its own worker, and a crash of one proxy's worker
re-registers that proxy's buffers on its new worker while the other proxy,
its worker and its buffers are untouched. Both clients, a real daemon.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipad import client as ipc
from ipad.client import Registered, make_buffer
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import TEST_MODULES, alive, wait_until, write_config

__all__ = ["connect"]  # the fixture

pytestmark = pytest.mark.timeout(120)

FRONT = bytes(range(256)) * 64
BACK = bytes(reversed(range(256))) * 64


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test made, closed when it ends."""
    made: list[int] = []
    yield made
    for fd in made:
        os.close(fd)


def test_isolated_proxies_keep_their_own_registered_buffers_across_a_crash(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """Two proxies, two workers, two buffers under the same id; one worker killed, both still right."""
    config = write_config(
        tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules='[modules.registered]\nisolation = "proxy"\n',
    )  # fmt: skip
    daemon = start_daemon(config)
    client = connect(daemon.socket)
    description = client.describe("registered")
    assert "digest" in {m.name for m in description.methods}
    digest = next(m for m in description.methods if m.name == "digest")
    assert digest.params is not None
    assert [(q.name, q.buffer) for q in digest.params] == [("frame", True)]
    front, back = client.request_proxy("registered"), client.request_proxy("registered")
    for proxy, data in ((front, FRONT), (back, BACK)):
        fd = make_buffer(data)
        fds.append(fd)
        client.map_buffers(proxy, {1: fd})  # the same id on each: each proxy's own worker
    pid_front, pid_back = client.call(front, "pid"), client.call(back, "pid")
    assert pid_front != pid_back
    os.kill(pid_front, signal.SIGKILL)
    wait_until(lambda: not alive(pid_front))
    again = client.call(front, "digest", fds={"frame": Registered(1)}, wait=30)
    assert again["sha"] == hashlib.sha256(FRONT).hexdigest()  # registered again on its new worker
    assert client.call(front, "pid") not in (pid_front, pid_back)
    other = client.call(back, "digest", fds={"frame": Registered(1)})
    assert other["sha"] == hashlib.sha256(BACK).hexdigest()
    assert client.call(back, "pid") == pid_back  # never restarted
    with pytest.raises(ipc.BadArguments, match="frame"):  # the description still checks calls
        client.call(back, "digest", {"frame": 3})
    client.release(front)
    client.release(back)
