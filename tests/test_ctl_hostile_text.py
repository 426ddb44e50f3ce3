"""What ipadctl prints of a module's words: never a terminal escape, never a forged line.

A module is untrusted, and much of what ipadctl shows comes from modules: their
log records and print() lines (``logs``), exception messages (``call``),
crash reasons and stacks (``crashes``), docstrings (``describe``). The
``chatty`` test module says all of it with escape sequences and newlines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.cli.ctl_io import shown
from ipad.cli.ctl_logs import record_line
from ipad.client import BlockingClient
from ipad.protocol.errors import IpadError
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, write_config

pytestmark = pytest.mark.timeout(120)

#: A forged record: a line that would pass for the daemon's report of another module's crash.
FORGED = "2026-12-06T20:00:00.000+00:00 error    worker.crash_report module=echo"
#: Sets the terminal's title (OSC), clears the screen, turns text red: all a module's doing.
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m"
HOSTILE = f"hi{ESCAPES}\n{FORGED}"
#: A line of ``ipadctl logs``' table starts with its record's time.
STAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


def test_shown_escapes_every_control_character_but_those_kept() -> None:
    """Escapes, newlines, NUL, DEL and C1 controls are escaped; kept ones and printables stay."""
    assert shown("ok \u00e9 \u4e2d") == "ok \u00e9 \u4e2d"
    assert shown("a\x1b[31mb\nc\x00\x7f\x9b") == "a\\x1b[31mb\\nc\\x00\\x7f\\x9b"
    assert shown("a\nb\tc\x1b", "\n\t") == "a\nb\tc\\x1b"
    assert shown(12) == "12"
    line = record_line({"seq": 1, "time": 0.0, "level": "info", "event": "module.log",
                        "text": HOSTILE, "exception": f"Traceback\n  {ESCAPES}"})  # fmt: skip
    assert "\x1b" not in line
    assert "\x07" not in line
    assert line.count("\n") == 2  # the exception's own line breaks, nothing of the text's


def clean(text: str) -> None:
    """No control character but newlines reached the output."""
    assert not [c for c in text if not c.isprintable() and c != "\n"], repr(text)


def test_ipadctl_shows_a_modules_words_escaped(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """logs, call, crashes and events print a hostile module's text escaped, on its own line."""
    config = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'
    daemon = start_daemon(
        write_config(tmp_path, config, modules="[modules.chatty]\n[modules.echo]\n"),
        log_level="info",
    )
    pid = daemon.worker_pids()["chatty"]
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("chatty")
        proxy.call("log", {"level": "warning", "event": HOSTILE,
                           "fields": {"detail": ESCAPES + "x"}}, timeout=WAIT)  # fmt: skip
        with pytest.raises(IpadError):  # the worker dies in the call, its print() logged
            proxy.call("print_then_crash", {"text": HOSTILE}, timeout=WAIT)
    daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
    daemon.wait_for("worker.stderr", lambda r: r.get("text") == f"hi{ESCAPES}")
    logs = daemon.ctl("logs", "chatty", "-n", "all").stdout
    clean(logs)
    assert "\\x1b]0;owned\\x07" in logs  # shown, escaped
    assert all(STAMPED.match(line) for line in logs.splitlines()), logs
    assert not [line for line in logs.splitlines() if line.startswith(FORGED)]
    crashes = daemon.ctl("crashes", "chatty").stdout
    clean(crashes)
    assert "Fatal Python error" in crashes
    events = daemon.ctl("events", "chatty", "-n", "50").stdout
    clean(events)
    # A module's exception message, as `ipadctl call` reports it.
    failed = daemon.ctl("call", "chatty", "log", '{"level": "no\\u001b[2J", "event": "x"}',
                        check=False)  # fmt: skip
    assert failed.returncode == 1
    assert "\\x1b[2J" in failed.stderr, failed.stderr
    clean(failed.stdout + failed.stderr)


def test_a_forged_stack_cannot_pass_for_another_crash(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """What a module writes where its stacks go shows indented, under its own crash's header."""
    config = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'
    daemon = start_daemon(write_config(tmp_path, config, modules="[modules.crashy]\n"))
    header = "2026-12-06 20:00:00 echo pid 4242: worker exited with signal SIGSEGV in process()"
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        with pytest.raises(IpadError):
            proxy.call("forge_then_segfault", {"text": f"\n{header}\n"}, timeout=WAIT)
    report = daemon.wait_for("worker.crash_report")
    assert header in report["stack"]  # the daemon keeps the worker's word as it was
    crashes = daemon.ctl("crashes", "crashy").stdout
    assert f"    {header}" in crashes
    assert not [line for line in crashes.splitlines() if line.startswith(header)], crashes
