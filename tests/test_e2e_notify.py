"""A real daemon speaking systemd's protocols to a stand-in manager, without systemd itself.

tests/test_systemd.py shows the same against a real systemd; these run
everywhere and look at every message the daemon sends.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, of_module, write_config
from tests.notify_manager import Manager

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., DaemonProcess]


def test_ready_status_watchdog_reload_and_stopping(
    start_daemon: Start, daemon_env: dict[str, str], manager: Manager, tmp_path: Path
) -> None:
    """READY with counts, pings, RELOADING with its time then READY on SIGHUP, STOPPING."""
    env = {**daemon_env, "NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "400000"}
    allowed = '[modules.faulty]\nenv = ["HOME", "NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID"]\n'
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]',
                          modules=f"[modules.awb]\n[modules.agc]\n{allowed}")  # fmt: skip
    daemon = start_daemon(config, env=env)
    ready = manager.wait_for(lambda m: "READY" in m)
    assert ready == {
        "READY": "1", "STATUS": "3 modules valid, 0 restarting, 0 in cooldown, 0 failed; 0 proxies"
    }  # fmt: skip
    assert manager.messages[0] == {"STATUS": "starting 3 modules"}
    first_ping = manager.wait_for(lambda m: m == {"WATCHDOG": "1"})
    manager.wait_for(lambda m: m == {"WATCHDOG": "1"} and m is not first_ping)

    # The variables are the daemon's alone: not even a module that allows them sees them.
    worker_env = json.loads(daemon.ctl("--json", "call", "faulty", "environ").stdout)
    assert "HOME" in worker_env
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID"} & set(worker_env)

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = manager.wait_for(lambda m: "RELOADING" in m)
    assert int(reloading["MONOTONIC_USEC"]) >= before
    assert reloading["STATUS"].startswith("reloading: 3 modules valid")
    again = manager.wait_for(lambda m: "READY" in m and m is not ready)
    assert manager.index(again) > manager.index(reloading)
    daemon.wait_for("daemon.reloaded")

    pid = daemon.worker_pids()["awb"]
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
    daemon.wait_for("worker.ready", lambda r: of_module("awb")(r) and r["worker_pid"] != pid)
    manager.wait_for(lambda m: m.get("STATUS", "").startswith("3 modules valid") and m is not again)

    assert daemon.stop() == 0
    stopping = manager.wait_for(lambda m: "STOPPING" in m)
    assert stopping["STATUS"].startswith("stopping: ")


def test_serves_on_an_inherited_socket_and_leaves_its_path(
    start_daemon: Start, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """Socket activation without systemd: the passed listener is served, and left in place."""
    directory = Path(f"/tmp/ipad-t-{secrets.token_hex(4)}")  # a short path: sun_path is small
    directory.mkdir(mode=0o700)
    path = directory / "ipad.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(str(path))
        listener.listen()
        env = {**daemon_env, "IPAD_SOCKET": str(path), "LISTEN_FDS": "1",
               "LISTEN_FDNAMES": "ipad.socket"}  # fmt: skip
        # As systemd does: the socket on fd 3 and LISTEN_PID naming the daemon itself.
        prefix = ["/bin/bash", "-c", f'exec 3<&{listener.fileno()}; export LISTEN_PID=$$; exec "$@"',
                  "activate"]  # fmt: skip
        daemon = start_daemon(write_config(tmp_path), env=env, prefix=prefix,
                              pass_fds=[listener.fileno()])  # fmt: skip
        activated = daemon.wait_for("socket.activated")
        assert activated == {**activated, "path": str(path), "fd": 3}
        status = json.loads(daemon.ctl("--json", "status").stdout)
        assert status["daemon"]["socket"] == str(path)
        assert daemon.stop() == 0
        assert path.exists()  # the socket unit's path, not the daemon's to remove
        assert not daemon.events("socket.stale_removed")
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def test_a_wrong_inherited_socket_is_a_clear_start_failure(
    start_daemon: Start, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """A stream socket from LISTEN_FDS: exit status 1 and a message naming the fix."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("")  # autobind: an abstract name, listening
        sock.listen()
        env = {**daemon_env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ipad.socket"}
        prefix = ["/bin/bash", "-c", f'exec 3<&{sock.fileno()}; export LISTEN_PID=$$; exec "$@"',
                  "activate"]  # fmt: skip
        daemon = start_daemon(write_config(tmp_path), env=env, prefix=prefix,
                              pass_fds=[sock.fileno()], wait=False)  # fmt: skip
        daemon.expect_unclean_exit("refuses to start, exit status 1: what is tested")
        failed = daemon.wait_for("daemon.start_failed")
        assert failed["error"] == (
            "fd 3 (ipad.socket) from LISTEN_FDS is a SOCK_STREAM socket, not SOCK_SEQPACKET: "
            "use ListenSequentialPacket="
        )
        assert daemon.proc.wait(timeout=WAIT) == 1
    finally:
        sock.close()
