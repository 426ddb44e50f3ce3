"""Red team of the jail and the seccomp filter: what an attacker who read the filter tries next.

A native worker (tests/native/bypass_worker.c), spawned through the jail,
tries to get past ipad/worker/seccomp.py: the same system calls through the x32
and i386 ABIs, high bits in the 32-bit command words of ``ioctl``, ``fcntl``
and ``clone``, O_ASYNC hidden among other flags, F_SETOWN_EX to a process
group, io_uring, a pidfd from CLONE_PIDFD, and the calls that reach into
other processes. Every attempt must be refused (EPERM/ENOSYS) or kill the
attempt (SIGSYS). Then it lies on its control socket as the jail speaks on
it, SPAWNED naming the daemon, other modules' workers and host processes:
the daemon must drop the liar and adopt, signal or reap none of them. The daemon, another module, a process of the workers' own
user and ``ipadctl status`` must be unharmed, and the daemon must stop
cleanly with SIGTERM (the ``start_daemon`` fixture).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from ipad.client._backlog import Backlog, RawModuleEvent
from ipad.protocol import wire as p
from tests.daemon_process import DaemonProcess, alive, open_fds, wait_until
from tests.test_e2e_hostile_sandbox import (
    GCC,
    Setup,
    assert_unharmed,
    nobody_dir,
    nobody_env,
    sentinel,
    setup,
    start,
    targets,
)

__all__ = ["nobody_dir", "nobody_env", "sentinel", "setup"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(120)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="root starts both daemons (CI runs as root)"
)
needs_gcc = pytest.mark.skipif(GCC is None, reason="needs gcc to build the native worker")

Start = Callable[..., DaemonProcess]

BYPASS_SOURCE = Path(__file__).parent / "native" / "bypass_worker.c"

BYPASS_MANIFEST = """
name = "bypass"
version = "1.0.0"
api_version = 1
worker = "bypass-native"
description = "a native worker that tries to get past the seccomp filter (tests)"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

#: What each attempt must get: refused by the filter, or the attempt killed (SIGSYS).
EXPECTED = {
    "x32_pidfd_open": "EPERM",  # the filter's, before the kernel's ENOSYS (no x32 here)
    "x32_kill": "EPERM",
    "i386_pidfd_open": "SYS",  # a foreign architecture's call kills the process
    "ioctl_setown_high": "EPERM",  # the kernel reads the low 32 bits: so does the filter
    "ioctl_async_high": "EPERM",
    "fcntl_setown_high": "EPERM",
    "fcntl_setsig_high": "EPERM",
    "setfl_mixed": "EPERM",  # O_ASYNC among O_NONBLOCK and O_APPEND
    "setfl_high": "EPERM",
    "setown_ex_pgrp": "EPERM",
    "io_uring": "EPERM",
    "clone_parent_high": "SYS",
    "clone_pidfd_signal": "EPERM",  # a pidfd of its own child: still no pidfd_send_signal
    "traceme": "SYS",
    "userfaultfd": "SYS",
    "perf_event_open": "SYS",
    "kcmp": "SYS",
    "unshare_user": "SYS",
}


#: What the daemon logs when a worker breaks the protocol (the second: once strings are capped).
PROTOCOL_EVENTS = ("worker.protocol_error", "worker.protocol_violation")
#: How the daemon logs the liar's end.
ENDED = ("worker.start_failed", "worker.exited")


def compile_bypass(binary: Path, lies: Path) -> None:
    """Build the bypass worker; it sends the packets in ``lies`` on its control socket."""
    subprocess.run([str(GCC), "-O1", "-Wall", f'-DLIES="{lies}"', "-o", str(binary),
                    str(BYPASS_SOURCE)], check=True, capture_output=True)  # fmt: skip


def build_bypass(setup: Setup) -> None:
    """Compile the bypass worker next to the hostile one, with a manifest of its own."""
    binary = setup.bin / "bypass-native"
    compile_bypass(binary, setup.native_dir / "lies")
    binary.chmod(0o755)
    (setup.native_dir / "bypass.toml").write_text(BYPASS_MANIFEST)


def write_lies(path: Path, pids: list[int]) -> None:
    """SPAWNED packets naming ``pids``, as the jail would send them, for the worker to send."""
    with path.open("wb") as file:
        for pid in pids:
            for in_cgroup in (False, True):
                packet = p.encode(p.Spawned(pid, in_cgroup))
                file.write(struct.pack("<I", len(packet)) + packet)
    path.chmod(0o644)


@needs_root
@needs_gcc
def test_seccomp_bypasses_and_spawned_lies_fail_in_a_spawned_native_worker(
    start_daemon: Start, setup: Setup, request: pytest.FixtureRequest,
    sentinel: subprocess.Popen[bytes],
) -> None:  # fmt: skip
    """Other ABIs, high bits, hidden O_ASYNC, F_SETOWN_EX, io_uring, CLONE_PIDFD: refused; lies too."""
    build_bypass(setup)
    config = setup.config(forkserver=False)
    daemon = start(start_daemon, setup, request, config)
    before = targets(daemon, sentinel)
    daemon.wait_standbys()
    fds = open_fds(daemon.proc.pid)
    held = daemon.worker_pids()
    write_lies(setup.native_dir / "lies", [*before.values(), *held.values(), 1])
    config.write_text(config.read_text() + '[modules.bypass]\nproxy = "sandboxed"\n')
    assert "added: bypass" in daemon.ctl("reload").stdout
    first = daemon.wait_for("worker.stderr", lambda r: r.get("module") == "bypass"
                            and " x32_kill=" in r["text"])  # fmt: skip
    got = dict(item.split("=", 1) for item in first["text"].split()[1:])
    assert got == EXPECTED
    pid = first["worker_pid"]
    # The liar is dropped for breaking the protocol (a SPAWNED is the jail's word, not its).
    errors: list[dict[str, object]] = []

    def dropped() -> bool:
        errors[:] = [r for name in PROTOCOL_EVENTS for r in daemon.events(name)
                     if r.get("worker_pid") == pid]  # fmt: skip
        return bool(errors)

    wait_until(dropped, timeout=10)
    assert "SPAWNED" in str(errors[0]["reason"]), errors
    # Its end: a failed start, or (strings capped) killed for the violation at once.
    wait_until(lambda: any(r.get("worker_pid") == pid for name in ENDED
                           for r in daemon.events(name)), timeout=10)  # fmt: skip
    assert_unharmed(daemon, before)
    assert alive(1)
    assert daemon.worker_pids()["hostile"] == held["hostile"]
    wait_until(lambda: open_fds(daemon.proc.pid) <= fds + 2)


@needs_gcc
def test_bypass_probes_work_without_the_filter(tmp_path: Path) -> None:
    """Unconfined, the same probes succeed: the test above measures the filter, not the kernel."""
    binary = tmp_path / "bypass"
    compile_bypass(binary, tmp_path / "no-lies")
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30,
                            check=False)  # fmt: skip
    assert result.returncode == 3
    got = dict(item.split("=", 1) for item in result.stderr.splitlines()[0].split()[1:])
    allowed = {name for name, outcome in got.items() if outcome == "ok"}
    # x32 needs a kernel built with it; perf_event_open may be off (perf_event_paranoid).
    assert allowed >= set(EXPECTED) - {"x32_pidfd_open", "x32_kill", "perf_event_open"}, got


def test_a_backlog_counts_event_names_by_what_they_hold() -> None:
    """Names of 4-byte characters cost what they hold, so the byte bound holds for them too."""
    backlog = Backlog()
    name = "\U0001f600" * 60_000  # 240 KB of UTF-8 as it arrived, 240 KB as a str
    for _ in range(20):
        backlog.put(RawModuleEvent(name, msgspec.Raw(b"\xc0")))
    held = len(backlog) * (sys.getsizeof(name) + 1)  # every one kept holds its name
    assert held <= backlog.max_bytes, (held, len(backlog), backlog.bytes)
    assert backlog.dropped == 20 - len(backlog)
