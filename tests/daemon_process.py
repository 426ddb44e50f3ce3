"""A real ipad daemon in a subprocess, for integration tests, read through its JSON log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipad._cgroup import remove_tree
from ipad._memory_cgroup import remove_tree as remove_memory_tree

REPO = Path(__file__).resolve().parent.parent
TEST_MODULES = Path(__file__).resolve().parent / "modules"

#: Generous bounds for a loaded CI machine; tests still finish in well under a second normally.
WAIT = 30.0

Record = dict[str, Any]


class DaemonProcess:
    """`python -m ipad` with a JSON log that a thread collects, so the pipe never fills."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        args: Sequence[str] = (),
        log_level: str | None = "debug",
    ) -> None:
        self.socket = Path(env["IPAD_SOCKET"])
        # None: the configuration's log_level rules, as without the option.
        level = ["--log-level", log_level] if log_level is not None else []
        self.env = env
        self.prefix = list(prefix)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ipad", "--config", str(config), "--log-format",
             "json", *level, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            pass_fds=pass_fds,
        )  # fmt: skip
        self.records: list[Record] = []
        self.raw: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            self._read_lines()
        except BaseException as exc:
            self.raw.append(f"READER FAILED: {exc!r}\n")
            raise

    def _read_lines(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.raw.append(line)
                with contextlib.suppress(json.JSONDecodeError):
                    self.records.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(
        self, event: str, where: Callable[[Record], bool] = lambda _: True, timeout: float = WAIT
    ) -> Record:
        """The first log record named ``event`` that satisfies ``where``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self.records:
                    if record.get("event") == event and where(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "".join(self.raw[-20:])
                    raise AssertionError(f"no {event} in the daemon's log; last lines:\n{tail}")
                self._changed.wait(min(left, 0.5))

    def events(self, event: str) -> list[Record]:
        """Every log record named ``event`` so far."""
        with self._changed:
            return [r for r in self.records if r.get("event") == event]

    def worker_pids(self) -> dict[str, int]:
        """The pid of each module's most recent worker, from the log."""
        return {r["module"]: r["worker_pid"] for r in self.events("worker.ready")}

    def wait_standbys(self) -> None:
        """Wait until each running module's standby is ready with a spare instance per proxy.

        Standbys start, and open their spares, in the background: a test that
        counts the daemon's descriptors must wait for them first.
        """

        def settled() -> bool:
            modules = json.loads(self.ctl("--json", "status").stdout)["modules"].values()
            return all(
                m["standby_pid"] is not None and m["standby_instances"] == m["proxies"]
                for m in modules
                if m["state"] == "running"
            )

        wait_until(settled)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ipadctl against this daemon."""
        result = subprocess.run(
            [*self.prefix, sys.executable, "-m", "ipad._cli_ctl", *args],
            capture_output=True, text=True, env=self.env, timeout=WAIT, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"ipadctl {args} failed: {result.stdout}{result.stderr}")
        return result

    def stop(self) -> int:
        """SIGTERM and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT)

    def kill(self) -> None:
        """Teardown: the daemon and every worker it started are gone and reaped."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        for record in self.events("worker.spawned") + self.events("worker.forked"):
            kill_group(record["worker_pid"])
        for record in self.events("cgroup.ready"):
            remove_tree(Path(record["cgroup"]))
        for record in self.events("memory.ready"):  # cgroup v1's memory controller
            remove_memory_tree(Path(record["cgroup"]))
        self._reader.join(timeout=WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def of_module(module: str) -> Callable[[Record], bool]:
    """A ``wait_for`` filter: records about ``module``."""
    return lambda record: record.get("module") == module


def kill_group(pid: int) -> None:
    """SIGKILL a worker's process group if anything of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def open_fds(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def rss_kib(pid: int) -> int:
    """Process ``pid``'s resident memory in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition the test cannot be told about (a process disappearing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def write_config(directory: Path, extra: str = "", *, modules: str | None = None) -> Path:
    """A config with the shipped modules (or ``modules``) plus ``extra`` TOML."""
    shipped = "[modules.awb]\n[modules.agc]\n[modules.echo]\n"
    path = directory / "config.toml"
    path.write_text(f"{extra}\n{shipped if modules is None else modules}")
    return path


@pytest.fixture
def daemon_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose socket and tuning search are this test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env["IPAD_SOCKET"] = str(tmp_path / "run" / "ipad.sock")
    env["IPAD_CONFIG_PATH"] = str(TEST_MODULES / "tuning")
    return env


@pytest.fixture
def start_daemon(
    tmp_path: Path, daemon_env: dict[str, str]
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemons; each is killed and reaped, workers included, after the test."""
    started: list[DaemonProcess] = []

    def start(
        config: Path | None = None,
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        log_level: str | None = "debug",
    ) -> DaemonProcess:
        config = config or write_config(tmp_path)
        daemon = DaemonProcess(config, env or daemon_env, prefix, pass_fds, log_level=log_level)
        started.append(daemon)
        if wait:
            daemon.wait_for("daemon.started")
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
