"""Logging: the same event dicts rendered to console, JSON lines and journald."""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from ipad.config.model import LogFormat, LogLevel
from ipad.daemon.journal import (
    JournalLogger,
    encode_field,
    field_name,
    journal_message,
    stderr_is_journal,
)
from ipad.daemon.log_setup import configure_logging


def parse_journal(datagram: bytes) -> dict[str, str]:
    """Decode a native-protocol datagram (both field forms) into a dict."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode()
            pos = end + 1
        else:
            (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
            fields[line.decode()] = datagram[end + 9 : end + 9 + size].decode()
            assert datagram[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
    return fields


def test_json_lines_carry_event_and_fields() -> None:
    """--log-format json writes one JSON object per record with its fields."""
    out = io.StringIO()
    configure_logging(LogLevel.INFO, LogFormat.JSON, stream=out)
    log = structlog.get_logger("ipad")
    log.info("worker.exited", module="awb", worker_pid=42, exit_status=3)
    log.debug("hidden")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "worker.exited"
    assert record["module"] == "awb"
    assert record["worker_pid"] == 42
    assert record["exit_status"] == 3
    assert record["level"] == "info"
    assert record["func_name"] == "test_json_lines_carry_event_and_fields"
    assert "timestamp" in record


def test_level_threshold() -> None:
    """Records below the configured level are dropped."""
    out = io.StringIO()
    configure_logging(LogLevel.ERROR, LogFormat.JSON, stream=out)
    log = structlog.get_logger("ipad")
    log.warning("dropped")
    log.error("kept")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["kept"]


def test_console_shows_event_and_fields() -> None:
    """Console output is one readable line with the event name and key=value fields."""
    out = io.StringIO()
    configure_logging(LogLevel.INFO, LogFormat.CONSOLE, stream=out)
    structlog.get_logger("ipad").info("proxy.valid", module="awb", proxy_id=7)
    text = out.getvalue()
    assert "proxy.valid" in text
    assert "module=awb" in text
    assert "proxy_id=7" in text
    assert "\x1b[" not in text  # no colours when not on a terminal


def test_console_escapes_what_a_module_could_write() -> None:
    """Escapes and newlines in values, keys and the logger column never reach the console raw."""
    out = io.StringIO()
    configure_logging(LogLevel.INFO, LogFormat.CONSOLE, stream=out)
    forged = "2026-12-06T20:00:00Z [error    ] worker.crash_report module=echo"
    structlog.get_logger("ipad").info(
        "module.log", text="\x1b]0;owned\x07", where=f"x\n{forged}",
        logger=f"lib\n{forged}", **{"k\x1b[2J": 1},
    )  # fmt: skip
    text = out.getvalue()
    assert text.count("\n") == 1, text
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "text=\\x1b]0;owned\\x07" in text  # shown, escaped once


def test_field_names_follow_journald_rules() -> None:
    """Structlog keys map to valid journal field names, with well-known renames."""
    assert field_name("module") == "MODULE"
    assert field_name("worker_pid") == "WORKER_PID"
    assert field_name("event") == "IPAD_EVENT"
    assert field_name("lineno") == "CODE_LINE"
    assert field_name("_private") == "PRIVATE"
    assert field_name("9lives") == "F_9LIVES"
    assert field_name("a-b.c") == "A_B_C"


def test_multiline_values_use_the_length_form() -> None:
    """A value with a newline is length-prefixed, as the native protocol requires."""
    assert encode_field("A", "x") == b"A=x\n"
    assert encode_field("A", "x\ny") == b"A\n" + struct.pack("<Q", 3) + b"x\ny\n"


def test_journal_message_fields() -> None:
    """A record becomes MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and one field per key."""
    data = journal_message(
        {"event": "worker.crashed", "level": "error", "module": "awb", "signal": "SIGKILL"},
        "worker.crashed module=awb",
    )
    fields = parse_journal(data)
    assert fields == {
        "MESSAGE": "worker.crashed module=awb",
        "PRIORITY": "3",
        "SYSLOG_IDENTIFIER": "ipad",
        "IPAD_EVENT": "worker.crashed",
        "MODULE": "awb",
        "SIGNAL": "SIGKILL",
    }


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing where journald's would be."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_journal_logger_sends_datagrams(journal_socket: tuple[socket.socket, str]) -> None:
    """The journal output sends each record as one datagram with its structured fields."""
    sock, path = journal_socket
    logger = JournalLogger(path)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            __import__("ipad.daemon.log_setup", fromlist=["render_journal"]).render_journal,
        ],
        logger_factory=lambda *_: logger,
    )
    structlog.get_logger().warning("worker.slow", module="agc", worker_pid=9)
    fields = parse_journal(sock.recv(65536))
    logger.close()
    assert fields["IPAD_EVENT"] == "worker.slow"
    assert fields["PRIORITY"] == "4"
    assert fields["MODULE"] == "agc"
    assert fields["WORKER_PID"] == "9"
    assert fields["MESSAGE"] == "worker.slow module=agc worker_pid=9"


def test_journal_logger_large_record_goes_by_memfd(
    journal_socket: tuple[socket.socket, str],
) -> None:
    """A record too large for a datagram is passed as a sealed memfd, as journald accepts."""
    sock, path = journal_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    logger = JournalLogger(path)
    big = journal_message({"event": "big", "blob": "x" * 300_000}, "big")
    logger.msg(big)
    msg, ancdata, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(4))
    logger.close()
    assert msg == b""
    [(level, kind, raw)] = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = struct.unpack("i", raw[:4])[0]
    with open(fd, "rb") as memfd:  # noqa: PTH123 - an fd, not a path
        memfd.seek(0)  # the offset is shared with the sender, which left it at the end
        assert parse_journal(memfd.read())["BLOB"] == "x" * 300_000


def test_stderr_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    """JOURNAL_STREAM is honoured only when it names the very file on the fd."""
    path = tmp_path / "f"
    path.write_text("")
    with path.open() as file:
        st = path.stat()
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, file.fileno())
        assert not stderr_is_journal(
            {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, file.fileno()
        )
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, file.fileno())
        assert not stderr_is_journal({}, file.fileno())
