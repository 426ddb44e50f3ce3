"""Module log records without a daemon: the worker's sender, the daemon's gate, the bounds.

The sender runs on a real SEQPACKET socket pair with a clock the test moves;
the daemon's gate is fed decoded records and its log captured.
"""

from __future__ import annotations

import io
import logging
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from ipad.config.model import LogFormat
from ipad.daemon.log_setup import renderers
from ipad.daemon.modlog import ModuleLogGate, field_key
from ipad.daemon.reactor import Timers
from ipad.ipa import ModuleContext, ModuleLog
from ipad.protocol import modlog as b
from ipad.protocol import wire as p
from ipad.protocol.errors import ModuleError
from ipad.worker.modlog import LogSender


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The time the test set."""
        return self.now


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The worker's and the daemon's end of a control socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        theirs.setblocking(False)
        yield ours, theirs


def received(sock: socket.socket) -> list[p.ModuleLog]:
    """Every MODULE_LOG waiting on the daemon's end."""
    records: list[p.ModuleLog] = []
    while True:
        try:
            packet = sock.recv(p.MAX_PACKET)
        except BlockingIOError:
            return records
        message = p.decode(packet, allowed=p.FROM_WORKER_CONTROL).message
        assert isinstance(message, p.ModuleLog)
        records.append(message)


def sender_for(sock: socket.socket, clock: Clock, level: str = "") -> LogSender:
    """A sender as the worker host makes it once LOAD (minor 3) came."""
    sender = LogSender(sock, clock)
    sender.configure(p.Load("m", "e:E", "/", "/t", minor=p.MINOR_MODULE_LOG, log_level=level))
    return sender


def test_a_daemon_that_does_not_read_costs_records_not_a_stall(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A full control socket: records are dropped and counted, the module never waits."""
    ours, theirs = pair
    clock = Clock()
    sender = sender_for(ours, clock)
    sent = 0
    for _ in range(100):  # intervals of LOG_BURST each, nothing read: the socket fills
        for _ in range(b.LOG_BURST):
            sender.log("info", "r", {"pad": "x" * 400})
        clock.now += b.LOG_INTERVAL
    sent = len(received(theirs))
    assert 0 < sent < 100 * b.LOG_BURST
    assert sender.pending == 100 * b.LOG_BURST - sent


def test_the_worker_limits_itself_and_reports_what_it_dropped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Past LOG_BURST records are dropped and counted; the count goes when the interval ends."""
    ours, theirs = pair
    clock = Clock()
    sender = sender_for(ours, clock)
    for n in range(b.LOG_BURST + 30):
        sender.log("info", "r", {"n": n})
    assert len(received(theirs)) == b.LOG_BURST
    sender.tick()  # the interval is not over: nothing yet
    assert received(theirs) == []
    assert sender.wait() == b.LOG_INTERVAL  # how long a worker without beats may sleep
    clock.now += b.LOG_INTERVAL
    sender.tick()
    (report,) = received(theirs)
    assert (report.text, report.suppressed, report.level) == ("", 30, "warning")
    assert sender.wait() == -1
    # A count not yet reported rides on the next record instead.
    for _ in range(b.LOG_BURST + 5):
        sender.log("info", "again", {})
    clock.now += b.LOG_INTERVAL
    sender.log("warning", "next", {})
    *_, last = received(theirs)
    assert (last.text, last.suppressed) == ("next", 5)


def test_exceptions_have_a_budget_of_their_own(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A module flooding its log still gets its exceptions reported, within EXCEPTION_BURST."""
    ours, theirs = pair
    sender = sender_for(ours, Clock())
    for _ in range(b.LOG_BURST + 10):
        sender.log("info", "noise", {})
    assert len(received(theirs)) == b.LOG_BURST  # read, as the daemon does, so none is refused
    for _ in range(b.EXCEPTION_BURST + 10):
        sender.exception(1, "process", ZeroDivisionError("division by zero"), "Traceback …")
    exceptions = received(theirs)
    assert {r.kind for r in exceptions} == {"exception"}
    assert len(exceptions) == b.EXCEPTION_BURST
    assert exceptions[0].suppressed == 10  # the noise dropped, reported with the next record
    assert sender.pending == 10
    assert (exceptions[0].method, exceptions[0].fields) == (
        "process", {"exception": "ZeroDivisionError"},
    )  # fmt: skip
    assert exceptions[0].text == "ZeroDivisionError: division by zero"


def test_records_below_the_daemons_level_are_not_sent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """LOAD's log_level: debug and info records stay in the worker at ``warning``."""
    ours, theirs = pair
    sender = sender_for(ours, Clock(), level="warning")
    for level in b.LEVELS:
        sender.log(level, level, {})
    assert [r.level for r in received(theirs)] == ["warning", "error", "critical"]


def test_an_older_daemon_gets_prefixed_stderr_lines(
    pair: tuple[socket.socket, socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without minor 3 a record is an sd-daemon line its output relay logs at that level."""
    ours, theirs = pair
    sender = LogSender(ours, Clock())
    sender.configure(p.Load("m", "e:E", "/", "/t", minor=2))
    sender.log("warning", "gain.clamped", {"gain": 3.5})
    sender.log("error", "two\nlines", {})
    assert received(theirs) == []
    assert capsys.readouterr().err.splitlines() == ["<4>gain.clamped gain=3.5", "<3>two lines"]


def test_a_record_is_bounded_before_it_is_sent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Text, values, names and the number of fields are clipped in the worker."""
    ours, theirs = pair
    sender = sender_for(ours, Clock())
    fields: dict[str, object] = {f"k{n}": object() for n in range(50)}
    fields["big"] = 2**70
    sender.log("info", "t" * 10_000, fields, traceback="x" * 100_000)
    (record,) = received(theirs)
    assert len(record.text) < b.MAX_LOG_TEXT + 40
    assert len(record.fields) == b.MAX_LOG_FIELDS
    assert record.fields["fields_dropped"] == 51 - (b.MAX_LOG_FIELDS - 1)
    assert str(record.fields["k0"]).startswith("<object object at")
    assert len(record.traceback) < b.MAX_LOG_TRACEBACK + 40


def test_a_record_without_logger_or_traceback_renders_without_none() -> None:
    """context.log's records (no logger, no traceback) show no "[None]" on the console."""
    gate = ModuleLogGate("lsc", 42)
    plain = p.ModuleLog("info", "lsc.configured", {"rows": 2}, instance_id=1, method="configure")
    routed = p.ModuleLog("warning", "gain clipped", {}, instance_id=1, logger="ipa_lsc")
    with structlog.testing.capture_logs() as logs:
        assert gate.receive(plain, 0.0) is None
        assert gate.receive(routed, 0.0) is None
    assert "logger" not in logs[0]
    assert "traceback" not in logs[0]
    assert logs[1]["logger"] == "ipa_lsc"
    lines: list[str] = []
    for record in logs:
        rendered: Any = {k: v for k, v in record.items() if k != "log_level"}
        for processor in renderers(LogFormat.CONSOLE, io.StringIO()):
            rendered = processor(None, "info", rendered)
        lines.append(rendered)
    assert "[None]" not in lines[0], lines[0]
    assert "traceback=" not in lines[0], lines[0]
    assert "[ipa_lsc]" in lines[1], lines[1]


def test_the_gate_logs_at_the_records_level_and_kills_a_flood() -> None:
    """The daemon logs up to its burst, counts the drops, and past its margin names a violation."""
    gate = ModuleLogGate("cam", 42, proxy_of=lambda instance: 7 if instance == 3 else None)
    record = p.ModuleLog("warning", "gain.clamped", {"gain": 3.5, "module": "awb"},
                         instance_id=3, method="process")  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        assert gate.receive(record, 0.0) is None
    (logged,) = logs
    assert logged == {
        "event": "module.log", "log_level": "warning", "text": "gain.clamped", "gain": 3.5,
        "field_module": "awb", "module": "cam", "worker_pid": 42, "instance": 3, "proxy_id": 7,
        "method": "process",
    }  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        results = [gate.receive(record, 1.0) for _ in range(b.DAEMON_LOG_BURST - 1)]
        results += [gate.receive(record, 1.0) for _ in range(b.DAEMON_LOG_FLOOD)]
        assert results == [None] * len(results)
        violation = gate.receive(record, 1.0)
    assert violation is not None
    assert "MODULE_LOG" in violation
    assert len(logs) == b.DAEMON_LOG_BURST - 1
    with structlog.testing.capture_logs() as logs:
        gate.flush()
    assert logs[0]["event"] == "module.log_suppressed"
    assert (logs[0]["suppressed"], logs[0]["by"]) == (b.DAEMON_LOG_FLOOD + 1, "daemon")


async def test_the_gate_reports_its_drops_when_the_interval_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the daemon's timers, the drop count is logged at the interval's end, unasked."""
    timers = Timers()
    gate = ModuleLogGate("cam", 42, timers=timers)
    record = p.ModuleLog("info", "r")
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        with structlog.testing.capture_logs() as logs:
            for _ in range(b.DAEMON_LOG_BURST + 5):
                assert gate.receive(record, trio.current_time()) is None
            await trio.sleep(b.LOG_INTERVAL + 1)
        nursery.cancel_scope.cancel()
    (report,) = [r for r in logs if r["event"] == "module.log_suppressed"]
    assert (report["suppressed"], report["by"], report["worker_pid"]) == (5, "daemon", 42)
    assert gate.timer is None


def test_an_unknown_level_is_info_and_an_empty_report_logs_only_the_count() -> None:
    """A level the daemon does not know is info; a bare ``suppressed`` logs just the count."""
    gate = ModuleLogGate("cam", 42)
    with structlog.testing.capture_logs() as logs:
        gate.receive(p.ModuleLog("loud", "x"), 0.0)
        gate.receive(p.ModuleLog("warning", "", suppressed=12), 0.0)
    assert [(r["event"], r["log_level"]) for r in logs] == [
        ("module.log", "info"), ("module.log_suppressed", "warning"),
    ]  # fmt: skip
    assert (logs[1]["suppressed"], logs[1]["by"]) == (12, "worker")


@pytest.mark.parametrize(
    ("key", "logged"),
    [("gain", "gain"), ("module", "field_module"), ("PRIORITY", "field_PRIORITY"),
     ("code_file", "field_code_file"), ("_pid", "_pid"), ("syslog_pid", "field_syslog_pid"),
     ("ipad_event", "field_ipad_event"), ("message", "field_message")],
)  # fmt: skip
def test_a_field_that_would_pass_for_the_daemons_own_is_renamed(key: str, logged: str) -> None:
    """Names the daemon's records or journald use are prefixed ``field_``; others are kept."""
    assert field_key(key) == logged


def test_outside_a_worker_records_go_to_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    """A module built in-process logs through ``logging`` (``ipad.module``), at its level."""
    context = ModuleContext({}, lambda _n, _d: None, 1)
    with caplog.at_level(logging.DEBUG, logger="ipad.module"):
        context.log.warning("gain.clamped", gain=3.5)
        try:
            raise ValueError("bad")  # noqa: TRY301 - an exception being handled
        except ValueError:
            context.log.exception("failed", event="forged")
    assert [(r.levelname, r.getMessage().splitlines()[0]) for r in caplog.records] == [
        ("WARNING", "gain.clamped gain=3.5"), ("ERROR", "failed event=forged"),
    ]  # fmt: skip
    assert "ValueError: bad" in caplog.records[1].getMessage()
    assert isinstance(ModuleLog(), ModuleLog)


def test_a_module_error_says_where_from_an_older_workers_traceback() -> None:
    """Without ``where`` in its details, the traceback's innermost frame says where."""
    tb = (
        'Traceback (most recent call last):\n  File "/x/host.py", line 9, in _call\n'
        '  File "/mods/awb.py", line 42, in process\nZeroDivisionError: division by zero'
    )
    error = ModuleError("division by zero", {"exception": "ZeroDivisionError", "traceback": tb})
    assert str(error) == "division by zero (ZeroDivisionError at awb.py:42 in process)"
    printed = "".join(traceback.format_exception(error))
    assert 'File "/mods/awb.py", line 42, in process' in printed  # uncaught, it shows
    assert str(ModuleError("plain")) == "plain"
