"""Worker processes as a real daemon starts them: output relayed, a clean fd set, SIGHUP ignored."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.daemon.relay import RELAY_BURST
from tests.daemon_process import TEST_MODULES, DaemonProcess, of_module, write_config

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., DaemonProcess]


def faulty_config(directory: Path, forkserver: bool = True) -> Path:
    """Only the fault-injecting test module, forked or spawned."""
    daemon = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\nforkserver = {str(forkserver).lower()}'
    return write_config(directory, daemon, modules="[modules.faulty]\n")


def call(daemon: DaemonProcess, method: str, args: dict[str, object] | None = None) -> object:
    """Call the faulty module through ipadctl and return the result."""
    reply = daemon.ctl("--json", "call", "faulty", method, json.dumps(args or {}))
    return json.loads(reply.stdout)


def has_text(text: str) -> Callable[[dict[str, object]], bool]:
    """A ``wait_for`` filter: relayed lines saying ``text``."""
    return lambda record: record.get("text") == text


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_output_lines_are_relayed_with_module_and_pid(
    start_daemon: Start, tmp_path: Path, forkserver: bool
) -> None:
    """Each line a worker writes, to stderr or stdout, is a record naming its module and pid."""
    daemon = start_daemon(faulty_config(tmp_path, forkserver))
    pid = daemon.worker_pids()["faulty"]
    call(daemon, "write_stderr", {"text": "hello {n}", "count": 2})
    call(daemon, "write_stderr", {"text": "<4>on stdout", "stdout": True})
    records = [
        daemon.wait_for("worker.stderr", has_text(t)) for t in ("hello 0", "hello 1", "on stdout")
    ]
    assert [(r["module"], r["worker_pid"], r["level"]) for r in records] == [
        ("faulty", pid, "info"), ("faulty", pid, "info"), ("faulty", pid, "warning"),
    ]  # fmt: skip


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_a_worker_has_exactly_its_own_descriptors(
    start_daemon: Start, tmp_path: Path, forkserver: bool
) -> None:
    """0 is /dev/null, 1 and 2 its output pipe, 3 its control socket: nothing of the daemon's."""
    daemon = start_daemon(faulty_config(tmp_path, forkserver))
    fds = {int(k): v for k, v in call(daemon, "fds").items()}  # type: ignore[attr-defined]
    assert fds[0] == "/dev/null"
    assert fds[1] == fds[2]
    assert fds[1].startswith("pipe:")
    assert fds[3].startswith("socket:")
    daemon_pipes = {str(Path(f"/proc/{daemon.proc.pid}/fd/{n}").readlink()) for n in (1, 2)}
    assert fds[1] not in daemon_pipes
    # The rest are the worker's own: its event loop, its heartbeat board (which the
    # daemon gave it with LOAD) and the channel of the call itself.
    rest = {v for k, v in fds.items() if k > 3}
    own = ("socket:", "anon_inode:[eventpoll]", "/memfd:ipad-heartbeat")
    assert all(v.startswith(own) for v in rest), fds


def test_a_noisy_worker_is_limited_and_the_drops_counted(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Thousands of lines: only the burst is relayed; the rest are counted, reported at its end."""
    daemon = start_daemon(faulty_config(tmp_path))
    pid = daemon.worker_pids()["faulty"]
    call(daemon, "write_stderr", {"text": "noise {n}", "count": RELAY_BURST + 3000})
    daemon.wait_for("worker.stderr", lambda r: r.get("text") == f"noise {RELAY_BURST - 1}")
    os.kill(pid, signal.SIGKILL)  # the pipe ends with the worker: its drops are reported now
    suppressed = daemon.wait_for("worker.stderr_suppressed", of_module("faulty"))
    assert suppressed["suppressed"] == 3000
    assert suppressed["worker_pid"] == pid
    relayed = [r for r in daemon.events("worker.stderr") if r["text"].startswith("noise ")]
    assert len(relayed) == RELAY_BURST


def test_the_fork_servers_output_is_relayed_too(start_daemon: Start, tmp_path: Path) -> None:
    """The fork server writes into a pipe of its own, relayed as module 'forkserver'."""
    trusted = (
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\ntrusted_module_dirs = ["{TEST_MODULES}"]'
    )
    config = write_config(tmp_path, trusted, modules="[modules.faulty]\n[modules.broken]\n")
    daemon = start_daemon(config)
    server = daemon.wait_for("forkserver.started")["pid"]
    # It preloads the trusted modules and says so on stderr when one fails to import.
    failed = daemon.wait_for("worker.stderr", lambda r: "forkserver.preload_failed" in r["text"])
    assert (failed["module"], failed["worker_pid"]) == ("forkserver", server)
    assert str(Path(f"/proc/{server}/fd/0").readlink()) == "/dev/null"


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_workers_ignore_sighup(start_daemon: Start, tmp_path: Path, forkserver: bool) -> None:
    """SIGHUP to every process of the service (systemctl kill -s HUP) kills no worker."""
    daemon = start_daemon(faulty_config(tmp_path, forkserver))
    pid = daemon.worker_pids()["faulty"]
    os.kill(pid, signal.SIGHUP)
    assert call(daemon, "pid") == pid
    assert not daemon.events("worker.exited")
