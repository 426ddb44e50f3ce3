"""A real ipad daemon for the benchmarks, and the configurations they run it with.

The daemon runs as ``python -m ipad`` with its JSON log in a file. Leaving
the context manager (an exception or SIGTERM included) stops it, reaps it,
kills any worker of it still there and removes its cgroups.
"""

from __future__ import annotations

import compileall
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _profile
from _common import REPO, dies_with_us

from ipad.daemon.cgroup import remove_tree


@functools.cache
def compile_bytecode() -> None:
    """Byte-compile ipad and its shipped modules once, as installing a package does.

    pip compiles an installed package's bytecode; an editable checkout gets
    it only when Python may write it, and this machine's environment says
    ``PYTHONDONTWRITEBYTECODE=1``: every daemon would then compile some 25
    modules from source at each start (about 40 ms), which no installed ipad
    does and the peers, installed from wheels, never pay.
    """
    for directory in (REPO / "ipad", REPO / "workers"):
        compileall.compile_dir(directory, quiet=1)


#: How the daemon is started (a diagnostic wrapper may replace it).
DAEMON_COMMAND = [sys.executable, "-m", "ipad"]
#: How long the daemon may take to start.
START_TIMEOUT = 60.0
ECHO_MANIFEST = REPO / "workers" / "modules" / "echo.toml"

#: Every restart immediate, never a cooldown: what a benchmark of many kills needs.
#: Heartbeats are pushed out of the way: they play no part in a restart.
FAST_RESTART = """\
max_failures = 1000000
initial_delay = "0"
max_delay = "0"
heartbeat_interval = "1h"
heartbeat_timeout = "2h"
"""


def module_config(
    name: str, *, standby: bool = True, restart: str = FAST_RESTART, proxy: str = "isolated"
) -> str:
    """One ``[modules.NAME]`` table with its proxy kind and ``restart`` overrides (standby too)."""
    return (
        f'[modules.{name}]\nproxy = "{proxy}"\n[modules.{name}.restart]\n{restart}'
        f"standby = {'true' if standby else 'false'}\n"
    )


def echo_copies(root: Path, count: int, prefix: str = "m") -> tuple[Path, list[str]]:
    """``count`` manifests of the shipped ``echo`` module under new names; their directory.

    Each copy is a module of its own (m000, m001, ...), so ``count`` real workers
    run. The copies' entry point is the shipped one, linked next to them.
    """
    mods = root / "modules"
    mods.mkdir()
    text = ECHO_MANIFEST.read_text()
    names = [f"{prefix}{i:03d}" for i in range(count)]
    for name in names:
        (mods / f"{name}.toml").write_text(text.replace('name = "echo"', f'name = "{name}"'))
        tuning = root / "tuning" / name
        tuning.mkdir(parents=True)
        (tuning / "uncalibrated.toml").write_text("")
    (mods / "ipa_modules").symlink_to(REPO / "workers" / "modules" / "ipa_modules")
    return mods, names


def copies_daemon_section(mods: Path, forkserver: bool = True) -> str:
    """The ``[daemon]`` table for :func:`echo_copies` modules, trusted for the fork server."""
    trust = f'trusted_module_dirs = ["{mods}"]\n' if forkserver else ""
    return (
        f'[daemon]\nmodule_dirs = ["{mods}"]\n'
        f"forkserver = {'true' if forkserver else 'false'}\n{trust}"
    )


class DaemonProcess:
    """``python -m ipad`` with a JSON log in a file; always killed and reaped by ``close``."""

    def __init__(
        self, directory: Path, config: str, log_level: str, env: dict[str, str] | None = None
    ) -> None:
        compile_bytecode()
        self.directory = directory
        self.socket = directory / "run" / "ipad.sock"
        self.config = directory / "config.toml"
        self.config.write_text(config)
        self.log_path = directory / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")} | (env or {})
        env["IPAD_SOCKET"] = str(self.socket)
        self._records: list[dict[str, Any]] = []
        self._read = 0  # bytes of the log parsed so far
        #: Wall-clock time of the launch, on the clock of the daemon's log timestamps.
        self.launched = time.time()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                dies_with_us([*DAEMON_COMMAND, "--config", str(self.config),
                              "--log-format", "json", "--log-level", log_level]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=env, cwd=REPO,
            )  # fmt: skip
        self._stack = contextlib.ExitStack()
        if _profile.directory is not None:
            output = _profile.directory / f"{directory.name}-daemon-{self.proc.pid}.txt"
            self._stack.enter_context(_profile.py_spy(self.proc.pid, output))

    def records(self) -> list[dict[str, Any]]:
        """Every JSON record the daemon has logged so far (the log is read only once)."""
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._read += len(complete)
        for line in complete.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self._records.append(record)
        return self._records

    def wait_for(
        self, event: str | tuple[str, ...], count: int = 1, timeout: float = START_TIMEOUT
    ) -> list[dict[str, Any]]:
        """The first ``count`` records named ``event`` (or any of several names).

        Raise if the daemon exits or they do not come within ``timeout``.
        """
        found = self.collect(event, count, timeout)
        if len(found) < count:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{len(found)} of {count} x {event} from the daemon; its log "
                               f"ends:\n{tail}")  # fmt: skip
        return found

    def collect(
        self, event: str | tuple[str, ...], count: int, timeout: float
    ) -> list[dict[str, Any]]:
        """Up to ``count`` records named ``event``: as many as came within ``timeout``."""
        names = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        looked = 0
        while True:
            records = self.records()
            found += [r for r in records[looked:] if r.get("event") in names]
            looked = len(records)
            if len(found) >= count or self.proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        return found[:count]

    def alive(self) -> bool:
        """Whether the daemon process is still running."""
        return self.proc.poll() is None

    def wait_started(self) -> dict[str, Any]:
        """The ``daemon.started`` record (every module running); raise if it exits or is slow."""
        return self.wait_for("daemon.started")[0]

    def close(self) -> None:
        """SIGTERM, then SIGKILL; reap; kill any worker of it still there; remove its cgroups."""
        self._stack.close()  # the profiler, if any, writes its file
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        records = self.records()
        for record in records:
            pid = record.get("worker_pid") if record.get("event") == "worker.ready" else None
            if record.get("event") == "forkserver.started":
                pid = record.get("pid")
            if isinstance(pid, int):
                _kill_stray_worker(pid)
        for record in records:
            if record.get("event") == "cgroup.ready" and Path(record["cgroup"]).exists():
                remove_tree(Path(record["cgroup"]))


def log_time(record: dict[str, Any]) -> float:
    """A log record's timestamp as seconds since the epoch (the wall clock)."""
    return dt.datetime.fromisoformat(record["timestamp"]).timestamp()


def _kill_stray_worker(pid: int) -> None:
    """SIGKILL the process group of ``pid`` if it is still an ipad worker (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"ipad-worker" in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_daemon(
    config: str,
    log_level: str = "info",
    keep_log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[DaemonProcess]:
    """A started daemon in a temporary directory, stopped and reaped on the way out."""
    with tempfile.TemporaryDirectory(prefix="ipad-bench-") as tmp:
        daemon = DaemonProcess(Path(tmp), config, log_level, env)
        try:
            daemon.wait_started()
            yield daemon
        finally:
            daemon.close()
            if keep_log is not None:
                keep_log.parent.mkdir(parents=True, exist_ok=True)
                keep_log.write_bytes(daemon.log_path.read_bytes())
