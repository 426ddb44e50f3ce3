"""ipadctl's events, logs, start/stop MODULE, session and exit statuses, against real daemons."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.cli import ctl, ctl_io
from tests.daemon_process import WAIT, DaemonProcess, wait_until, write_config

Start = Callable[..., DaemonProcess]


class Follower:
    """A running ``ipadctl ... --follow`` whose output lines a thread collects."""

    def __init__(self, daemon: DaemonProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            daemon.ctl_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=daemon.env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool]) -> str:
        """The first line that satisfies ``predicate``, waited for within WAIT."""
        wait_until(lambda: any(predicate(line) for line in self.lines))
        return next(line for line in self.lines if predicate(line))

    def end(self, sig: signal.Signals | None) -> tuple[int, str]:
        """Send ``sig`` (None: wait for it to end by itself); its exit status and stderr."""
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(WAIT)
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        with self.proc.stderr, self.proc.stdout:
            return status, self.proc.stderr.read()


def test_exit_statuses_agree_with_ctl() -> None:
    """The subcommand modules' exit statuses are ipadctl's own."""
    assert (ctl_io.EXIT_FAILED, ctl_io.EXIT_USAGE, ctl_io.EXIT_NOT_RUNNING,
            ctl_io.EXIT_NO_SUCH_MODULE) == (ctl.EXIT_FAILED, ctl.EXIT_USAGE,
                                            ctl.EXIT_NOT_RUNNING, ctl.EXIT_NO_SUCH_MODULE)  # fmt: skip


@pytest.mark.timeout(120)
def test_events_have_times_and_take_module_and_n(start_daemon: Start, tmp_path: Path) -> None:
    """`events [MODULE] [-n N]`: the last N (default 10) events, of MODULE, with their times."""
    before = time.time()
    daemon = start_daemon(write_config(tmp_path))
    wait_until(lambda: json.loads(daemon.ctl("--json", "status").stdout)["modules"]["echo"]
               ["state"] == "running")  # fmt: skip
    for _ in range(4):  # enough events that the default 10 leaves some out
        assert daemon.ctl("restart", "echo").returncode == 0
    every = [json.loads(x) for x in daemon.ctl("--json", "events", "-n", "all").stdout.split("\n")
             if x]  # fmt: skip
    assert len(every) > 10
    assert all(before <= e["time"] <= time.time() for e in every), every
    assert [e["time"] for e in every] == sorted(e["time"] for e in every)
    default = [json.loads(x) for x in daemon.ctl("--json", "events").stdout.splitlines()]
    assert default == every[-10:]
    three = [json.loads(x) for x in daemon.ctl("events", "echo", "-n", "3", "--json")
             .stdout.splitlines()]  # fmt: skip
    assert three == [e for e in every if e["module"] == "echo"][-3:]
    assert daemon.ctl("--json", "events", "-n", "0").stdout == ""
    table = daemon.ctl("events", "awb", "-n", "all").stdout.splitlines()
    awb = [e for e in every if e["module"] == "awb"]
    assert len(table) == len(awb)
    for line, event in zip(table, awb, strict=True):
        stamp, seq, what = line.split()[:3]
        parsed = datetime.datetime.fromisoformat(stamp)
        assert parsed.utcoffset() is not None  # local time, with its offset
        assert abs(parsed.timestamp() - event["time"]) < 0.001
        assert (int(seq), what) == (event["seq"], f"{event['kind']}:awb")
    unknown = daemon.ctl("events", "nope", check=False)
    assert unknown.returncode == 4, unknown.stderr
    assert unknown.stderr == "ipadctl: no module 'nope'\n"
    bad = daemon.ctl("events", "-n", "-1", check=False)
    assert bad.returncode == 2


@pytest.mark.timeout(120)
def test_events_follow_ends_0_on_signals_and_1_when_the_daemon_goes(
    start_daemon: Start, tmp_path: Path
) -> None:
    """--follow prints new events of MODULE until ^C or SIGTERM (exit 0) or the daemon goes (1)."""
    daemon = start_daemon(write_config(tmp_path))
    for sig in (signal.SIGINT, signal.SIGTERM):
        follower = Follower(daemon, "events", "echo", "--follow", "--json", "-n", "0")
        time.sleep(0.5)  # subscribed (its history empty): what comes now is new
        assert daemon.ctl("restart", "echo").returncode == 0
        follower.wait_line(lambda line: json.loads(line)["state"] == "running")
        assert {json.loads(line)["module"] for line in follower.lines} == {"echo"}
        status, stderr = follower.end(sig)
        assert status == 0, (sig, stderr)
    follower = Follower(daemon, "events", "--follow")
    follower.wait_line(lambda line: "module:echo" in line)
    assert daemon.stop() == 0
    status, stderr = follower.end(None)
    assert status == 1
    assert stderr.startswith("ipadctl: the daemon went away: "), stderr


@pytest.mark.timeout(90)
def test_describe_and_call_of_an_unknown_module_exit_4(start_daemon: Start, tmp_path: Path) -> None:
    """`describe` and `call` exit 4 for a module the daemon does not know, 1 for other errors."""
    daemon = start_daemon(write_config(tmp_path))
    described = daemon.ctl("describe", "nope", check=False)
    assert described.returncode == 4, described.stderr
    assert "nope" in described.stderr
    called = daemon.ctl("--json", "call", "nope", "echo", check=False)
    assert called.returncode == 4, called.stdout
    assert json.loads(called.stdout)["error"]["code"] == "unknown_module"
    wrong_method = daemon.ctl("call", "echo", "no_such_method", check=False)
    assert wrong_method.returncode == 1, wrong_method.stderr


def session(daemon: DaemonProcess, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ipadctl session ARGS`` with ``stdin`` as its input."""
    return subprocess.run(
        daemon.ctl_argv("session", *args), input=stdin, capture_output=True, text=True,
        env=daemon.env, timeout=WAIT, check=False,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_session_runs_every_line_on_one_proxy(start_daemon: Start, tmp_path: Path) -> None:
    """`session MODULE` calls each stdin line on one proxy; a failure stops it unless -k."""
    daemon = start_daemon(write_config(tmp_path))
    script = 'count\n# a comment\n\ncount {}\n  echo {"text": "hi"}\nlabel\ncount\n'
    result = session(daemon, script, "echo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # count goes up on the one instance: every line ran on the same proxy.
    assert [lines[0], lines[1], lines[2], lines[4]] == ["1", "2", '{"text": "hi"}', "3"]
    as_json = session(daemon, 'echo {"text": "x"}\nlabel\n', "echo", "--json")
    label = json.loads(daemon.ctl("--json", "call", "echo", "label").stdout)
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [{"text": "x"}, label]
    # The awb pipeline of the issue: init, configure, in order, on one proxy.
    awb = session(daemon, "init {}\nconfigure {}\n", "awb", "--json")
    assert awb.returncode == 0, awb.stderr
    assert awb.stdout.splitlines() == ["null", "null"]
    failing = 'count\nfail {"message": "boom"}\ncount\n'
    stopped = session(daemon, failing, "echo")
    assert stopped.returncode == 1
    assert stopped.stdout.splitlines() == ["1"]
    assert stopped.stderr.startswith("ipadctl: line 2: fail: "), stopped.stderr
    assert "boom" in stopped.stderr
    going = session(daemon, failing + "nonsense {\n", "echo", "--keep-going", "--json")
    assert going.returncode == 1
    out = [json.loads(line) for line in going.stdout.splitlines()]
    assert out[0] == 1
    assert out[1]["error"]["message"].startswith("line 2: fail: ")
    assert out[2] == 2
    assert out[3]["error"]["code"] == "usage"
    unreadable = session(daemon, "count [1]\ncount\n", "echo")
    assert unreadable.returncode == 2
    assert unreadable.stdout == ""
    assert "line 1: count: arguments must be a JSON object" in unreadable.stderr
    unknown = session(daemon, "count\n", "nope")
    assert unknown.returncode == 4, unknown.stderr
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["daemon"]["proxies"] == 0  # every session's proxy was released
