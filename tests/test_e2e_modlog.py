"""A module's log records, exceptions and print() lines in a real daemon's log.

The ``chatty`` test module logs through ``context.log`` and Python's
``logging``, raises, floods, prints then segfaults, and writes MODULE_LOG
packets to its control socket itself past every bound.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipad.client import BlockingClient
from ipad.protocol import modlog as b
from ipad.protocol.errors import IpadError, ModuleError
from tests.client_drivers import Connect, connect
from tests.daemon_process import (
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    Record,
    of_module,
    others_still_work,
    write_config,
)

pytestmark = pytest.mark.timeout(90)
__all__ = ["connect"]  # a fixture

Start = Callable[..., DaemonProcess]


def chatty_config(directory: Path, forkserver: bool = True) -> Path:
    """The chatty module, forked or spawned, and echo (for ``others_still_work``)."""
    daemon = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\nforkserver = {str(forkserver).lower()}'
    return write_config(directory, daemon, modules="[modules.chatty]\n[modules.echo]\n")


def text_is(text: str) -> Callable[[Record], bool]:
    """A ``wait_for`` filter: module records saying ``text``."""
    return lambda record: record.get("text") == text


def call(daemon: DaemonProcess, method: str, args: dict[str, Any] | None = None) -> tuple[Any, int]:
    """Call chatty on a proxy of its own: the result and the proxy's id."""
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        return proxy.call(method, args or {}, timeout=WAIT), proxy.proxy_id


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_records_keep_their_level_and_name_module_worker_and_proxy(
    start_daemon: Start, tmp_path: Path, forkserver: bool
) -> None:
    """context.log records arrive at their level with module, worker_pid, proxy; debug filtered."""
    daemon = start_daemon(chatty_config(tmp_path, forkserver), log_level="info")
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        for level in ("debug", "info", "warning", "error", "critical"):
            proxy.call("log", {"level": level, "event": f"at.{level}",
                               "fields": {"gain": 1.5, "frame": 7}}, timeout=WAIT)  # fmt: skip
        proxy_id = proxy.proxy_id
    records = {level: daemon.wait_for("module.log", text_is(f"at.{level}"))
               for level in ("info", "warning", "error", "critical")}  # fmt: skip
    for level, record in records.items():
        assert record["level"] == level
        assert (record["module"], record["worker_pid"]) == ("chatty", pid)
        assert (record["proxy_id"], record["method"]) == (proxy_id, "log")
        assert (record["gain"], record["frame"]) == (1.5, 7)
    assert not [r for r in daemon.events("module.log") if r.get("text") == "at.debug"]


def test_the_constructor_logs_at_load_and_per_instance(start_daemon: Start, tmp_path: Path) -> None:
    """Records of the load's probe instance (no instance) and of a proxy's instance both arrive."""
    daemon = start_daemon(chatty_config(tmp_path), log_level="info")
    pid = daemon.worker_pids()["chatty"]
    probe = daemon.wait_for("module.log", lambda r: r.get("number") == 0)
    assert (probe["worker_pid"], probe["instance"], probe["text"]) == (pid, None, "chatty.created")
    # The module imports logging: its import-time bridge carries the probe's logging record too.
    daemon.wait_for("module.log", lambda r: r.get("logger") == "chatty.lib"
                    and r["worker_pid"] == pid)  # fmt: skip
    call(daemon, "log", {"level": "info", "event": "x"})
    # An instance's constructor (maybe a spare's, opened before any proxy holds it).
    record = daemon.wait_for("module.log", lambda r: (r.get("number") or 0) > 0
                             and r["worker_pid"] == pid)  # fmt: skip
    assert record["instance"] == record["number"]
    daemon.wait_for("module.log", lambda r: r.get("logger") == "chatty.lib"
                    and r["instance"] == record["number"])  # fmt: skip


def test_python_logging_arrives_at_its_level(start_daemon: Start, tmp_path: Path) -> None:
    """logging.warning arrives as warning (not info), with the logger's name and where."""
    daemon = start_daemon(chatty_config(tmp_path), log_level="info")
    for level in ("debug", "info", "warning", "error"):
        call(daemon, "std_log", {"level": level, "message": f"lib says {level}"})
    for level in ("info", "warning", "error"):
        record = daemon.wait_for("module.log", text_is(f"lib says {level}"))
        assert (record["level"], record["logger"], record["module"]) == (level, "chatty.lib",
                                                                         "chatty")  # fmt: skip
        assert record["where"].startswith("chatty.py:")
    assert not [r for r in daemon.events("module.log") if r.get("text") == "lib says debug"]
    # Nothing of it went the old way, as an info line on stderr.
    assert not [r for r in daemon.events("worker.stderr") if "lib says" in r.get("text", "")]


def test_an_exception_is_logged_with_method_and_traceback(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The client gets its error, saying where; the daemon logs method, type and traceback."""
    daemon = start_daemon(chatty_config(tmp_path))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        with pytest.raises(ModuleError) as caught:
            proxy.call("divide", {"value": 0}, timeout=WAIT)
    said = str(caught.value)
    assert said.startswith("division by zero (ZeroDivisionError at chatty.py:")
    assert said.endswith(" in divide)")
    record = daemon.wait_for("module.exception", of_module("chatty"))
    assert record["level"] == "error"
    assert (record["method"], record["exception_type"]) == ("divide", "ZeroDivisionError")
    assert "return 1 / value" in record["traceback"]
    assert record["proxy_id"] == proxy.proxy_id
    # ipadctl says where, and prints the traceback.
    failed = daemon.ctl("call", "chatty", "divide", '{"value": 0}', check=False)
    assert failed.returncode != 0
    assert "(ZeroDivisionError at chatty.py:" in failed.stderr
    assert "ZeroDivisionError: division by zero" in failed.stderr.splitlines()[-1]


def test_both_clients_say_where_a_module_raised(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Trio and blocking clients alike: the ModuleError's text names type, file:line, function."""
    daemon = start_daemon(chatty_config(tmp_path))
    client = connect(daemon.socket)
    proxy = client.request_proxy("chatty")
    with pytest.raises(ModuleError) as caught:
        client.call(proxy, "divide", {"value": 0}, timeout=WAIT)
    assert re.fullmatch(r"division by zero \(ZeroDivisionError at chatty\.py:\d+ in divide\)",
                        str(caught.value))  # fmt: skip
    (note,) = caught.value.__notes__
    assert "return 1 / value" in note
    assert note.endswith("ZeroDivisionError: division by zero")


def test_an_exception_that_cannot_be_printed_is_still_an_error_reply(
    start_daemon: Start, tmp_path: Path
) -> None:
    """An exception whose str() raises: the client gets module_error, the worker lives on."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        with pytest.raises(ModuleError) as caught:
            proxy.call("unprintable", timeout=WAIT)
        assert proxy.call("divide", {"value": 2}, timeout=WAIT) == 0.5
    assert caught.value.details["exception"] == "Unprintable"
    record = daemon.wait_for("module.exception", of_module("chatty"))
    assert (record["exception_type"], record["text"]) == ("Unprintable", "Unprintable")
    assert daemon.worker_pids()["chatty"] == pid
    assert not daemon.events("worker.exited")


def test_a_huge_record_is_clipped(start_daemon: Start, tmp_path: Path) -> None:
    """Text, field values and the number of fields are cut to the documented bounds."""
    daemon = start_daemon(chatty_config(tmp_path))
    fields: dict[str, Any] = {f"k{n}": n for n in range(100)}
    fields["k0"] = "v" * 100_000
    fields["x" * 1000] = "a name too long"
    call(daemon, "log", {"level": "warning", "event": "big" + "x" * 100_000, "fields": fields})
    record = daemon.wait_for("module.log", lambda r: r.get("text", "").startswith("bigxxx"))
    assert len(record["text"]) < b.MAX_LOG_TEXT + 40
    assert len(record["k0"]) < b.MAX_LOG_VALUE + 40
    assert record["fields_dropped"] == 101 - (b.MAX_LOG_FIELDS - 1)
    assert sum(1 for key in record if key.startswith("k")) == b.MAX_LOG_FIELDS - 1


def test_a_module_field_cannot_pass_for_the_daemons_own(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Fields named as the daemon's or journald's own are renamed, never override them."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    forged = {"module": "awb", "worker_pid": 1, "priority": 0, "syslog_identifier": "kernel",
              "event": "worker.crashed", "level": "critical"}  # fmt: skip
    call(daemon, "log", {"level": "info", "event": "forged", "fields": forged})
    record = daemon.wait_for("module.log", text_is("forged"))
    assert (record["module"], record["worker_pid"], record["level"]) == ("chatty", pid, "info")
    assert record["field_module"] == "awb"
    assert record["field_priority"] == 0
    assert record["field_syslog_identifier"] == "kernel"
    assert record["field_event"] == "worker.crashed"


def test_a_flooding_module_is_limited_and_the_daemon_serves_on(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Thousands of records: LOG_BURST logged, the rest counted and reported; others served."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    flood = 5000
    assert call(daemon, "flood", {"count": flood})[0] == flood
    others_still_work(daemon)
    # The worker reports its drops once its interval is over.
    report = daemon.wait_for("module.log_suppressed", of_module("chatty"),
                             timeout=b.LOG_INTERVAL + WAIT)  # fmt: skip
    assert (report["by"], report["worker_pid"]) == ("worker", pid)
    logged = [r for r in daemon.events("module.log") if r.get("text") == "flood"]
    # The burst less what its instances' constructors logged before, in the same interval.
    assert b.LOG_BURST - 10 <= len(logged) <= b.LOG_BURST
    assert report["suppressed"] == flood - len(logged)
    assert daemon.worker_pids()["chatty"] == pid  # an honest flood is no violation


def test_raw_records_past_the_bounds_are_clipped(start_daemon: Start, tmp_path: Path) -> None:
    """A module writing MODULE_LOG itself, with a huge text and many fields, is clipped too."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    assert call(daemon, "raw_log", {"count": 1, "text_size": 200_000, "fields": 500})[0] == 1
    record = daemon.wait_for("module.log", lambda r: r.get("text", "").startswith("xxx"))
    assert len(record["text"]) < b.MAX_LOG_TEXT + 40
    assert record["fields_dropped"] == 500 - (b.MAX_LOG_FIELDS - 1)
    assert record["worker_pid"] == pid


def test_a_raw_flood_is_a_protocol_violation(start_daemon: Start, tmp_path: Path) -> None:
    """Records past the daemon's limit and its flood margin: the worker is killed; others serve."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        with contextlib.suppress(IpadError):  # it may be killed before it answers
            proxy.call("raw_log", {"count": 20_000, "wait": True}, timeout=WAIT)
    violation = daemon.wait_for("worker.protocol_violation", of_module("chatty"))
    assert violation["worker_pid"] == pid
    assert "MODULE_LOG" in violation["reason"]
    logged = [r for r in daemon.events("module.log") if r.get("worker_pid") == pid]
    assert len(logged) <= b.DAEMON_LOG_BURST
    daemon.wait_for("worker.ready", lambda r: r["module"] == "chatty" and r["worker_pid"] != pid)
    others_still_work(daemon)


def test_a_malformed_record_is_a_protocol_violation(start_daemon: Start, tmp_path: Path) -> None:
    """A MODULE_LOG whose field is not a scalar: the worker is killed, as for any bad packet."""
    daemon = start_daemon(chatty_config(tmp_path))
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client, contextlib.suppress(IpadError):
        client.request_proxy("chatty").call("raw_malformed", timeout=WAIT)
    violation = daemon.wait_for("worker.protocol_violation", of_module("chatty"))
    assert violation["worker_pid"] == pid
    assert violation["reason"].startswith("bad MODULE_LOG payload")
    others_still_work(daemon)


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_a_printed_line_survives_a_segfault(
    start_daemon: Start, tmp_path: Path, forkserver: bool
) -> None:
    """Stdout is line-buffered: a print() just before SIGSEGV is in the daemon's log."""
    daemon = start_daemon(chatty_config(tmp_path, forkserver))
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        with pytest.raises(IpadError):  # the worker dies in the call
            proxy.call("print_then_crash", {"text": "last words"}, timeout=WAIT)
    exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
    assert exited.get("signal") == "SIGSEGV", exited
    line = daemon.wait_for("worker.stderr", lambda r: r.get("text") == "last words")
    assert line["worker_pid"] == pid


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_a_sandboxed_worker_per_proxy_logs_and_prints_the_same(
    start_daemon: Start, tmp_path: Path, forkserver: bool
) -> None:
    """Sandboxed, one worker per proxy: records name that proxy; print() survives a SIGSEGV."""
    daemon_conf = (f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'
                   f"forkserver = {str(forkserver).lower()}\n"
                   '[sandbox]\noptional = ["memory_max"]\n')  # fmt: skip
    modules = '[modules.chatty]\nproxy = "sandboxed"\nisolation = "proxy"\n[modules.echo]\n'
    daemon = start_daemon(write_config(tmp_path, daemon_conf, modules=modules))
    with BlockingClient(daemon.socket) as client:
        first, second = client.request_proxy("chatty"), client.request_proxy("chatty")
        for proxy in (first, second):
            proxy.call("log", {"level": "warning", "event": f"from.{proxy.proxy_id}"}, timeout=WAIT)
        with pytest.raises(ModuleError):
            second.call("divide", {"value": 0}, timeout=WAIT)
        with pytest.raises(IpadError):
            first.call("print_then_crash", {"text": "sandboxed last words"}, timeout=WAIT)
        for proxy in (first, second):
            record = daemon.wait_for("module.log", text_is(f"from.{proxy.proxy_id}"))
            assert (record["proxy_id"], record["level"]) == (proxy.proxy_id, "warning")
            assert record["worker_pid"] == proxy.info.worker_pid
        raised = daemon.wait_for("module.exception", of_module("chatty"))
        assert (raised["proxy_id"], raised["method"]) == (second.proxy_id, "divide")
        line = daemon.wait_for("worker.stderr", lambda r: r.get("text") == "sandboxed last words")
        assert line["worker_pid"] == first.info.worker_pid
    others_still_work(daemon)
