"""Admin operations belong to the daemon: a client leaving mid-way cuts nothing short.

Real daemons, real ipadctl processes killed half-way, a stand-in service
manager for the RELOADING/READY pair, and a fork server that cannot be
started again because the daemon ran out of descriptors.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_process import (
    TEST_MODULES,
    DaemonProcess,
    open_fds,
    wait_until,
    write_config,
)
from tests.notify_manager import Manager

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]


def sleepy_config(directory: Path, stop_timeout: str) -> Path:
    """The sleepy module alone (its load takes a second), with ``stop_timeout``."""
    return write_config(
        directory,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules=f"[modules.sleepy]\n[modules.sleepy.restart]\nstandby = false\n"
        f'stop_timeout = "{stop_timeout}"\n',
    )


def sleepy_env(daemon_env: dict[str, str], directory: Path) -> dict[str, str]:
    """Every load of the sleepy module takes a second."""
    tuning = directory / "sleepy.toml"
    tuning.write_text("load_seconds = 1.0\n")
    return {**daemon_env, "IPAD_SLEEPY_TUNING_FILE": str(tuning)}


#: ipadctl processes ``ctl`` started in the running test; ``reap_ctls`` ends them after it.
_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def reap_ctls() -> Iterator[None]:
    """Kill and reap any ipadctl a test left running (an assertion failed before its wait)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.returncode is None:  # never waited for by the test
            proc.kill()
            proc.communicate(timeout=30)


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    """Run ipadctl against ``daemon`` and leave it running (the test may kill it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipad.cli.ctl", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env,
    )  # fmt: skip
    _STARTED.append(proc)
    return proc


def state_of(daemon: DaemonProcess, module: str) -> dict[str, object]:
    """``ipadctl --json status`` of one module."""
    status: dict[str, object] = json.loads(daemon.ctl("--json", "status").stdout)["modules"][module]
    return status


def test_a_client_leaving_mid_reload_cuts_nothing_short(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A reload whose ipadctl is killed half-way completes; later reloads and SIGHUP work.

    Before, the reload ran in the client's own task: a changed module was
    stopped and never started again, and every later reload failed with KeyError.
    """
    daemon = start_daemon(sleepy_config(tmp_path, "300ms"), env=sleepy_env(daemon_env, tmp_path))
    first = daemon.worker_pids()["sleepy"]
    sleepy_config(tmp_path, "400ms")  # a changed restart policy: the module restarts
    reload = ctl(daemon, "reload")
    daemon.wait_for("daemon.reloading")
    daemon.wait_for("worker.forked", lambda r: r["module"] == "sleepy" and r["worker_pid"] != first)
    reload.kill()  # mid-load of the new worker: the client is gone, the daemon carries on
    reload.communicate(timeout=30)
    done = daemon.wait_for("daemon.reloaded")
    assert done["changed"] == ["sleepy"]
    wait_until(lambda: state_of(daemon, "sleepy")["state"] == "running")
    assert state_of(daemon, "sleepy")["worker_pid"] not in (first, None)
    again = json.loads(daemon.ctl("--json", "reload").stdout)
    assert again == {
        "added": [],
        "removed": [],
        "changed": [],
        "code_changed": [],
        "unchanged": ["sleepy"],
    }
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(daemon.events("daemon.reloaded")) == 3)
    assert not daemon.events("admin.failed")
    assert daemon.proc.poll() is None


def test_reloading_is_always_followed_by_ready(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], manager: Manager
) -> None:
    """RELOADING=1 gets its READY=1 when the asking client leaves, and when the file is invalid."""
    env = {**sleepy_env(daemon_env, tmp_path), "NOTIFY_SOCKET": manager.address}
    config = sleepy_config(tmp_path, "300ms")
    daemon = start_daemon(config, env=env)
    manager.wait_for(lambda m: "READY" in m)
    sleepy_config(tmp_path, "400ms")
    reload = ctl(daemon, "reload")
    manager.wait_for(lambda m: "RELOADING" in m)
    reload.kill()
    reload.communicate(timeout=30)
    daemon.wait_for("daemon.reloaded")
    config.write_text("[daemon\n")  # invalid: the old configuration keeps running
    failed = daemon.ctl("reload", check=False)
    assert failed.returncode == 1
    daemon.wait_for("daemon.reload_failed")
    kinds: list[str] = []

    def paired() -> bool:
        kinds[:] = [k for m in manager.messages for k in ("READY", "RELOADING") if k in m]
        return kinds.count("READY") == 3

    manager.wait_for(lambda _: paired())
    assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY"]


def test_queued_admin_operations_are_refused_with_a_reason_when_the_daemon_stops(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Reloads waiting their turn when the daemon stops are refused (code ``stopping``)."""
    daemon = start_daemon(sleepy_config(tmp_path, "300ms"), env=sleepy_env(daemon_env, tmp_path))
    # The reload's new worker loads for 20 s: it is still under way when the daemon is told
    # to stop, however long the waiting ipadctls take to start on a busy machine (a 1 s load
    # could end first, and the next reload, with nothing left to change, succeed).
    (tmp_path / "sleepy.toml").write_text("load_seconds = 20.0\n")
    sleepy_config(tmp_path, "400ms")
    running = ctl(daemon, "reload")
    daemon.wait_for("daemon.reloading")
    waiting = [ctl(daemon, "--json", "reload") for _ in range(3)]
    wait_until(lambda: len(daemon.events("admin.requested")) == 4)
    report = daemon.stop_cleanly("sigterm")
    report.check()
    outputs = [proc.communicate(timeout=30) for proc in waiting]
    for proc, (stdout, stderr) in zip(waiting, outputs, strict=True):
        assert proc.returncode == 1
        assert "the daemon is stopping" in stdout + stderr
    running.communicate(timeout=30)


def test_a_fork_server_that_cannot_start_again_is_retried_and_never_stops_the_daemon(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Out of descriptors, the fork server's restart fails; the daemon serves on and retries.

    Before, the OSError left Launcher.run and stopped the whole daemon.
    """
    daemon = start_daemon(write_config(tmp_path, modules="[modules.echo]\n"))
    server = daemon.wait_for("forkserver.started")["pid"]
    daemon.wait_standbys()
    pid = daemon.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Not enough for a new fork server's pipe, socket pair and pidfd (lowered: a soft limit
    # goes back up without CAP_SYS_RESOURCE).
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid), hard))
    try:
        os.kill(server, signal.SIGKILL)
        failed = daemon.wait_for("forkserver.start_failed")
        assert "Too many open files" in failed["error"]
        assert daemon.ctl("call", "echo", "echo", '{"text": "still here"}').stdout.strip()
        assert daemon.proc.poll() is None
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    again = daemon.wait_for("forkserver.started", lambda r: r["pid"] != server, timeout=30)
    assert again["pid"] != server
    time.sleep(0.1)
    assert daemon.proc.poll() is None
