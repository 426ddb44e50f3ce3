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
from typing import Any

import pytest

from ipad import client as ipc
from ipad.cli import ctl, ctl_io
from tests.client_drivers import Connect, connect
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, alive, wait_until, write_config

__all__ = ["connect"]  # the fixture

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


def module_status(daemon: DaemonProcess, module: str) -> dict[str, Any]:
    """``ipadctl --json status MODULE``'s entry for it."""
    entry: dict[str, Any] = json.loads(daemon.ctl("--json", "status", module).stdout)["modules"][
        module
    ]
    return entry


@pytest.mark.timeout(150)
@pytest.mark.parametrize("isolation", ["module", "proxy"])
def test_stop_and_start_a_module(
    start_daemon: Start, tmp_path: Path, connect: Connect, isolation: str
) -> None:
    """`stop MODULE` ends its workers for good (invalid proxies, no restart, reload too); `start` recovers them."""
    config = tmp_path / "config.toml"
    config.write_text(f'[modules.echo]\nisolation = "{isolation}"\n[modules.awb]\n')
    daemon = start_daemon(config)
    client = connect(daemon.socket)
    echo = client.request_proxy("echo")
    pid = client.call(echo, "pid")
    stopped = daemon.ctl("stop", "echo")
    assert stopped.stdout == "echo: stopped\n", stopped.stderr
    wait_until(lambda: not alive(pid))
    status = daemon.ctl("--json", "status", "echo", check=False)
    assert status.returncode == 3
    entry = json.loads(status.stdout)["modules"]["echo"]
    assert (entry["state"], entry["reason"], entry["worker_pid"]) == (
        "stopped", "stopped by operator", None)  # fmt: skip
    assert daemon.ctl("status", "awb").returncode == 0  # the others run on
    with pytest.raises(ipc.IpadError, match="stopped by operator"):
        client.call(echo, "echo", {"text": "while stopped"})
    with pytest.raises(ipc.IpadError, match="stopped by operator"):
        client.request_proxy("echo")
    assert not client.attr(echo, "valid")
    time.sleep(0.5)  # a restart would have come by now
    assert module_status(daemon, "echo")["state"] == "stopped"
    assert daemon.ctl("stop", "echo").stdout == "echo: stopped\n"  # again: nothing to do
    # A reload keeps it stopped, whether it changed or not.
    assert daemon.ctl("reload").returncode == 0
    config.write_text(config.read_text() + "[modules.echo.restart]\nmax_failures = 7\n")
    reloaded = json.loads(daemon.ctl("--json", "reload").stdout)
    assert reloaded["changed"] == ["echo"]
    assert module_status(daemon, "echo")["state"] == "stopped"
    assert module_status(daemon, "echo")["reason"] == "stopped by operator"
    started = daemon.ctl("start", "echo")
    assert started.stdout == "echo: running\n", started.stderr
    assert client.call(echo, "echo", {"text": "back"}, wait=WAIT)["text"] == "back"
    assert client.attr(echo, "valid")
    assert client.call(echo, "pid") != pid
    assert daemon.ctl("start", "echo").stdout == "echo: running\n"  # running: left as it is
    as_json = daemon.ctl("--json", "stop", "echo")
    assert json.loads(as_json.stdout) == {"module": "echo", "state": "stopped",
                                          "reason": "stopped by operator"}  # fmt: skip
    assert daemon.ctl("restart", "echo").stdout == "echo: running\n"  # restart starts it too
    for command in ("stop", "start"):
        unknown = daemon.ctl(command, "nope", check=False)
        assert unknown.returncode == 4, unknown.stderr
        assert unknown.stderr.startswith("ipadctl: no module 'nope'; modules: awb, echo")
    daemon.ctl("stop", "echo")  # the daemon's own stop, with a module stopped, is clean


@pytest.mark.timeout(150)
def test_stop_and_start_in_cooldown_and_while_starting(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """`stop MODULE` ends a cooldown or a start under way; `start` exits 1 if it fails to load."""
    flag = tmp_path / "crash"
    flag.write_text("")
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    daemon_env["IPAD_FAULTY_TUNING_FILE"] = str(tuning)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n[modules.faulty]\n[modules.slow]\n'
        '[modules.faulty.restart]\nmax_failures = 1\ncooldown_interval = "1h"\n'
        '[modules.slow.restart]\nstart_timeout = "30s"\nstop_timeout = "1s"\n'
    )
    daemon = start_daemon(config, wait=False)
    daemon.wait_for("module.cooldown", lambda r: r["module"] == "faulty")
    assert daemon.ctl("stop", "faulty").stdout == "faulty: stopped\n"
    assert module_status(daemon, "faulty")["reason"] == "stopped by operator"
    failing = daemon.ctl("start", "faulty", check=False)
    assert failing.returncode == 1, failing.stdout
    assert failing.stderr.startswith("ipadctl: faulty did not start: "), failing.stderr
    flag.unlink()
    assert daemon.ctl("start", "faulty").stdout == "faulty: running\n"
    assert module_status(daemon, "slow")["state"] == "starting"
    assert daemon.ctl("stop", "slow").stdout == "slow: stopped\n"
    assert module_status(daemon, "slow")["worker_pid"] is None
    waited = daemon.ctl("--timeout", "2", "start", "slow", check=False)  # it loads for 60 s
    assert waited.returncode == 1, waited.stdout
    assert module_status(daemon, "slow")["state"] == "starting"
    assert daemon.ctl("stop", "slow").stdout == "slow: stopped\n"  # at once: not queued
