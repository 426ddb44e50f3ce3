"""Records in a real journald, with every structured field intact, read back with journalctl.

systemd-journald runs alone in a private mount namespace whose /run is a fresh
tmpfs, so it writes only there (the recipe in shared/notes); it is killed at
the end of the module. tests/test_systemd.py shows the same under systemd.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ipad.config.model import LogFormat, LogLevel
from ipad.daemon.cgroup import remove_tree
from ipad.daemon.journal import JournalLogger, journal_message
from ipad.daemon.log_setup import configure_logging
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, write_config
from tests.journal_reader import JOURNALCTL, JournalReader

JOURNALD = "/lib/systemd/systemd-journald"
UNSHARE = shutil.which("unshare") or "unshare"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="a private mount namespace for journald needs root"
    ),
    pytest.mark.skipif(
        not Path(JOURNALD).exists() or JOURNALCTL is None or UNSHARE == "unshare",
        reason="needs systemd-journald, journalctl and unshare",
    ),
]

#: Start journald with a /run of its own: it writes nothing outside it.
START = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec " + JOURNALD


class Journald:
    """A journald of the test's own: where to send records, and a reader of what it stored."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c", START],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        #: unshare without --fork execs: the process is journald itself.
        self.pid = self.proc.pid
        self.root = Path(f"/proc/{self.pid}/root")
        self.socket = str(self.root / "run/systemd/journal/socket")
        self.reader = JournalReader(["-D", str(self.root / "run/log/journal")])
        deadline = time.monotonic() + WAIT
        while not Path(self.socket).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("systemd-journald did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill and reap it; its tmpfs goes with its mount namespace."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)


@pytest.fixture(scope="module")
def journald() -> Iterator[Journald]:
    """One journald for this module's tests, killed at its end."""
    instance = Journald()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(autouse=True)
def _close_journal_logger() -> Iterator[None]:
    """The journal logger configure_logging made lives for the process; in a test, close it."""
    yield
    logger = structlog.get_config()["logger_factory"]()
    if isinstance(logger, JournalLogger):
        logger.close()


def test_a_record_keeps_every_field(journald: Journald) -> None:
    """MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, IPAD_EVENT, our fields and the code location."""
    configure_logging(LogLevel.INFO, LogFormat.JOURNAL, journal_socket=journald.socket)
    tag = f"t{os.getpid()}-{time.monotonic_ns()}"
    log = structlog.get_logger("ipad")
    line = inspect.stack()[0].lineno + 1
    log.error("worker.exited", module="awb", worker_pid=4242, proxy_id=7, signal="SIGKILL", tag=tag)
    entry = journald.reader.wait_for(f"TAG={tag}")
    assert (
        entry["MESSAGE"]
        == f"worker.exited module=awb worker_pid=4242 proxy_id=7 signal=SIGKILL tag={tag}"
    )
    assert {k: entry[k] for k in ("PRIORITY", "SYSLOG_IDENTIFIER", "IPAD_EVENT", "MODULE",
                                  "WORKER_PID", "PROXY_ID", "SIGNAL")} == {
        "PRIORITY": "3", "SYSLOG_IDENTIFIER": "ipad", "IPAD_EVENT": "worker.exited",
        "MODULE": "awb", "WORKER_PID": "4242", "PROXY_ID": "7", "SIGNAL": "SIGKILL",
    }  # fmt: skip
    assert entry["CODE_FILE"] == "tests/test_journald.py"  # from the checkout, like ipad/…
    assert entry["CODE_FUNC"] == "test_a_record_keeps_every_field"
    assert entry["CODE_LINE"] == str(line)
    assert entry["_TRANSPORT"] == "journal"
    assert "TIMESTAMP" not in entry  # journald stamps records itself


def test_tracebacks_and_large_records_arrive_whole(journald: Journald) -> None:
    """A multi-line field (length-prefixed) and a record too big for a datagram (memfd)."""
    configure_logging(LogLevel.INFO, LogFormat.JOURNAL, journal_socket=journald.socket)
    tag = f"t{os.getpid()}-{time.monotonic_ns()}"
    log = structlog.get_logger("ipad")
    try:
        raise ValueError("boom")  # noqa: TRY301 - a real traceback to log
    except ValueError:
        log.exception("request.internal_error", tag=tag)
    logger = JournalLogger(journald.socket)
    logger.msg(journal_message({"event": "big", "tag": tag, "blob": "x" * 300_000}, "big"))
    logger.close()
    entry = journald.reader.wait_for(f"TAG={tag}", "IPAD_EVENT=request.internal_error")
    assert entry["PRIORITY"] == "3"
    assert "ValueError: boom" in entry["EXCEPTION"]
    assert "Traceback (most recent call last)" in entry["MESSAGE"]
    big = journald.reader.wait_for(f"TAG={tag}", "IPAD_EVENT=big")
    assert big["BLOB"] == "x" * 300_000


def test_without_journald_records_fall_back_to_the_console() -> None:
    """--log-format journal where no journald listens: console output, and a warning saying so."""
    out = io.StringIO()
    configure_logging(LogLevel.INFO, LogFormat.JOURNAL, stream=out, journal_socket="/nonexistent")
    structlog.get_logger("ipad").info("daemon.started", pid=1)
    text = out.getvalue()
    assert "journal.unavailable" in text
    assert "daemon.started" in text


def test_a_journald_that_went_away_loses_no_message(tmp_path: Path) -> None:
    """While journald restarts, each record's MESSAGE goes to stderr (the journal's stream) instead."""
    out = io.StringIO()
    logger = JournalLogger(str(tmp_path / "gone.sock"), out)
    logger.msg(journal_message({"event": "worker.exited"}, "worker.exited module=awb"))
    logger.msg(journal_message({"event": "x"}, "two\nlines"))
    logger.close()
    assert out.getvalue() == "worker.exited module=awb\ntwo\nlines\n"


def test_a_daemon_logging_to_journald(
    journald: Journald, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """--log-format journal: a worker's crash, its restart and its stderr, each with its fields."""
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]',
                          modules="[modules.faulty]\n")  # fmt: skip
    # In journald's mount namespace, the daemon finds it at the usual /run/systemd/journal/socket.
    env = daemon_env
    prefix = ["nsenter", "-t", str(journald.pid), "-m"]
    daemon = DaemonProcess(config, env, prefix, args=["--log-format", "journal"])
    cgroups: list[str] = []
    try:
        daemon_pid = daemon.proc.pid
        mine = [f"_PID={daemon_pid}"]
        started = journald.reader.wait_for("IPAD_EVENT=daemon.started", *mine)
        cgroups = [e["CGROUP"] for e in journald.reader.entries("IPAD_EVENT=cgroup.ready", *mine)]
        assert started["SYSLOG_IDENTIFIER"] == "ipad"
        ready = journald.reader.wait_for("IPAD_EVENT=worker.ready", "MODULE=faulty", *mine)
        pid = int(ready["WORKER_PID"])

        reply = daemon.ctl(
            "--json", "call", "faulty", "write_stderr", '{"text": "<4>from the module"}'
        )
        assert json.loads(reply.stdout) == 1
        relayed = journald.reader.wait_for("IPAD_EVENT=worker.stderr", *mine)
        assert (relayed["MODULE"], relayed["WORKER_PID"]) == ("faulty", str(pid))
        assert (relayed["TEXT"], relayed["PRIORITY"]) == ("from the module", "4")

        os.kill(pid, signal.SIGKILL)
        crash = journald.reader.wait_for("IPAD_EVENT=worker.exited", f"WORKER_PID={pid}", *mine)
        assert (crash["MODULE"], crash["SIGNAL"], crash["PRIORITY"]) == ("faulty", "SIGKILL", "3")
        assert (crash["CODE_FILE"], crash["CODE_FUNC"]) == (
            "ipad/daemon/lifecycle.py",
            "_exit_reason",
        )
        journald.reader.wait_for("IPAD_EVENT=worker.ready", "MODULE=faulty", *mine,
                                 where=lambda e: e["WORKER_PID"] != str(pid))  # fmt: skip
        assert daemon.stop() == 0
        journald.reader.wait_for("IPAD_EVENT=daemon.stopped", *mine)
    finally:
        daemon.kill()
        for cgroup in cgroups:  # a daemon killed above could not remove its own
            remove_tree(Path(cgroup))


def test_module_records_reach_journald_with_their_fields(
    journald: Journald, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A module's records: MODULE=, WORKER_PID=, PRIORITY= at their level, its own fields too."""
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]',
                          modules="[modules.chatty]\n")  # fmt: skip
    prefix = ["nsenter", "-t", str(journald.pid), "-m"]
    daemon = DaemonProcess(config, daemon_env, prefix, args=["--log-format", "journal"])
    cgroups: list[str] = []
    try:
        mine = [f"_PID={daemon.proc.pid}"]
        journald.reader.wait_for("IPAD_EVENT=daemon.started", *mine)
        cgroups = [e["CGROUP"] for e in journald.reader.entries("IPAD_EVENT=cgroup.ready", *mine)]
        ready = journald.reader.wait_for("IPAD_EVENT=worker.ready", "MODULE=chatty", *mine)
        pid = ready["WORKER_PID"]
        args = '{"level": "warning", "event": "gain.clamped", "fields": {"gain": 3.5}}'
        daemon.ctl("call", "chatty", "log", args)
        daemon.ctl("call", "chatty", "std_log", '{"level": "error", "message": "lib failed"}')
        daemon.ctl("call", "chatty", "divide", '{"value": 0}', check=False)
        warning = journald.reader.wait_for("IPAD_EVENT=module.log", "TEXT=gain.clamped", *mine)
        assert (warning["MODULE"], warning["WORKER_PID"], warning["PRIORITY"]) == (
            "chatty", pid, "4",
        )  # fmt: skip
        assert (warning["GAIN"], warning["METHOD"]) == ("3.5", "log")
        assert warning["SYSLOG_IDENTIFIER"] == "ipad"
        error = journald.reader.wait_for("IPAD_EVENT=module.log", "TEXT=lib failed", *mine)
        assert (error["PRIORITY"], error["LOGGER"], error["MODULE"]) == ("3", "chatty.lib",
                                                                         "chatty")  # fmt: skip
        raised = journald.reader.wait_for("IPAD_EVENT=module.exception", "MODULE=chatty", *mine)
        assert (raised["PRIORITY"], raised["METHOD"]) == ("3", "divide")
        assert raised["EXCEPTION_TYPE"] == "ZeroDivisionError"
        assert "return 1 / value" in raised["TRACEBACK"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        for cgroup in cgroups:
            remove_tree(Path(cgroup))
