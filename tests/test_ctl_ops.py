"""ipadctl's events, logs, start/stop MODULE, session and exit statuses, against real daemons."""

from __future__ import annotations

import datetime
import grp
import json
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ipad import client as ipc
from ipad.cli import ctl, ctl_io
from ipad.client import BlockingClient
from ipad.daemon.log_ring import (
    FIELD_CHARS,
    FIELDS,
    RECORD_CHARS,
    RECORDS,
    RING_CHARS,
    LogRing,
    log_reply,
)
from ipad.protocol import wire as p
from tests.client_drivers import Connect, connect
from tests.daemon_process import (
    REPO,
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    alive,
    wait_until,
    write_config,
)
from tests.privileges import NOBODY, as_user, needs_setpriv

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
    # --fd with a plain file: its bytes reach the module (the client takes only memfds).
    data = tmp_path / "data.bin"
    data.write_bytes(b"abc" * 100)
    summed = daemon.ctl("--json", "call", "echo", "checksum", "--fd", f"data={data}")
    assert json.loads(summed.stdout) == {"size": 300, "crc32": zlib.crc32(b"abc" * 100)}


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
    data = tmp_path / "data.bin"
    data.write_bytes(b"frame" * 1000)
    buffers = session(daemon, f"checksum data=@{data}\nchecksum {{}} data=@{data}\n", "echo",
                      "--json")  # fmt: skip
    assert buffers.returncode == 0, buffers.stderr
    expected = {"size": 5000, "crc32": zlib.crc32(b"frame" * 1000)}
    assert [json.loads(line) for line in buffers.stdout.splitlines()] == [expected, expected]
    missing = session(daemon, f"checksum data=@{tmp_path / 'none'}\n", "echo")
    assert missing.returncode == 2
    assert "cannot open" in missing.stderr
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
    assert not alive(pid)  # answered once its workers are gone
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


# --- logs ---------------------------------------------------------------------------------


def test_the_ring_keeps_the_last_records_clipped_and_pages_with_a_cursor() -> None:
    """The ring is bounded, clips fields, filters by module and pages forward from a cursor."""
    ring = LogRing(size=50)
    for n in range(80):
        ring.keep({"event": "e", "level": "info", "module": "a" if n % 2 else "b", "n": n,
                   "timestamp": "x", "filename": "f.py"})  # fmt: skip
    assert len(ring.records) == 50
    assert ring.records[0]["n"] == 30
    assert "timestamp" not in ring.records[0]
    assert "filename" not in ring.records[0]
    last, cursor, more = ring.query(None, 3, None)
    assert [r["n"] for r in last] == [77, 78, 79]
    assert (cursor, more) == (80, False)
    odd, cursor, more = ring.query("a", 4, None)
    assert [r["n"] for r in odd] == [73, 75, 77, 79]
    page, cursor, more = ring.query("b", 2, 60)
    assert [r["n"] for r in page] == [60, 62]
    assert more
    page, cursor, more = ring.query("b", 100, cursor)
    assert [r["n"] for r in page] == list(range(64, 80, 2))
    assert not more
    assert ring.query(None, 5, ring.seq) == ([], ring.seq, False)
    # A hostile LOGS: absurd counts and cursors give at most the ring, never an error.
    assert len(ring.query(None, 2**62, -(2**62))[0]) == 50
    assert ring.query(None, -(2**62), None)[0] == []
    assert ring.query("x" * 100_000, 10, 2**62)[0] == []
    assert ring.query(None, 0, None)[0] == []
    ring.keep({"event": "big", "text": "x" * 10_000, "exc_info": ValueError("boom"),
               **{f"f{i}": i for i in range(100)}})  # fmt: skip
    big = ring.records[-1]
    assert len(big["text"]) == FIELD_CHARS
    assert big["exception"].startswith("ValueError: boom")
    assert len(big) <= FIELDS + 2
    # Records far larger than one reply: a reply is cut to fit, and says more follow.
    for _ in range(50):
        ring.keep({f"f{i}": "y" * 600 for i in range(40)})
    full, cursor, more = ring.query(None, 50, None)
    assert 0 < len(full) < 50
    assert more
    assert len(msgspec.msgpack.encode(log_reply(p.Logs(lines=50), ring))) < p.MAX_PAYLOAD


def test_the_ring_is_bounded_in_characters_whatever_modules_log() -> None:
    """Records of 32 fields of 512 wide characters (a module's worst) keep the ring small."""
    ring = LogRing()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(RECORDS):
            wide = chr(0x10000 + n)  # 4 bytes a character in a Python string
            ring.keep({"event": "module.log", "level": "info", "text": wide * 1024,
                       **{f"field{i}": wide * 600 for i in range(31)}})  # fmt: skip
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 8 * RING_CHARS, held  # 35-66 MB before the bound
    assert ring.chars <= RING_CHARS
    newest = ring.records[-1]
    assert newest["seq"] == RECORDS
    assert sum(len(k) + len(v) for k, v in newest.items() if isinstance(v, str)) <= RECORD_CHARS
    assert newest["fields_left_out"] > 0
    assert newest["text"].endswith("\u2026")
    # The daemon's own records, a few hundred characters each: all RECORDS are kept, and
    # a module's flood after them pushes out none (only its own kind).
    for n in range(RECORDS):
        ring.keep({"event": "proxy.state_changed", "level": "info", "module": "awb",
                   "proxy_id": n, "state": "valid", "worker_pid": 1234})  # fmt: skip
    for _ in range(RECORDS):
        ring.keep({"event": "worker.stderr", "module": "evil", "text": "w" * 4000})
    own = [r for r in ring.records if r["event"] == "proxy.state_changed"]
    assert [r["proxy_id"] for r in own] == list(range(RECORDS))
    assert ring.records[-1]["seq"] == ring.seq  # oldest first, merged by number
    assert [r["seq"] for r in ring.records] == sorted(r["seq"] for r in ring.records)


@pytest.mark.timeout(120)
def test_logs_from_the_ring_with_module_n_and_follow(start_daemon: Start, tmp_path: Path) -> None:
    """`logs [MODULE] [-n N] [--follow]` outside systemd: the daemon's own recent records."""
    daemon = start_daemon(write_config(tmp_path))
    records = [json.loads(x) for x in daemon.ctl("--json", "logs", "-n", "5").stdout.splitlines()]
    assert len(records) == 5
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert all({"time", "level", "event"} <= set(r) for r in records)
    assert daemon.ctl("restart", "echo").returncode == 0
    echo = [json.loads(x) for x in daemon.ctl("logs", "echo", "--json", "-n", "all")
            .stdout.splitlines()]  # fmt: skip
    assert {r["module"] for r in echo} == {"echo"}
    assert "module.restart_asked" in [r["event"] for r in echo]
    assert "worker.ready" in [r["event"] for r in echo]
    table = daemon.ctl("logs", "echo", "-n", "2").stdout.splitlines()
    assert len(table) == 2
    stamp, level, event = table[-1].split()[:3]
    assert datetime.datetime.fromisoformat(stamp).utcoffset() is not None
    assert (level, event) == (echo[-1]["level"], echo[-1]["event"])
    assert daemon.ctl("logs", "nope", check=False).returncode == 4
    # Hostile: a client's name of 60 000 characters is logged, but kept clipped.
    huge = "h" * 60_000
    with BlockingClient(daemon.socket, name=huge):
        pass
    named = [json.loads(x) for x in daemon.ctl("--json", "logs", "-n", "all").stdout.splitlines()
             if '"client.connected"' in x]  # fmt: skip
    assert any(r["client"] == "h" * (FIELD_CHARS - 1) + "\u2026" for r in named)
    follower = Follower(daemon, "logs", "echo", "--follow", "-n", "0", "--json")
    time.sleep(1.0)  # its first look at the ring is done: what follows is new
    assert daemon.ctl("restart", "echo").returncode == 0
    follower.wait_line(lambda line: json.loads(line)["event"] == "worker.ready")
    assert {json.loads(line)["module"] for line in follower.lines} == {"echo"}
    status, stderr = follower.end(signal.SIGINT)
    assert status == 0, stderr


@needs_setpriv
@pytest.mark.timeout(120)
def test_only_admins_may_read_the_logs_and_stop_or_start_modules(
    start_daemon: Start, shared_dir: Path, daemon_env: dict[str, str]
) -> None:
    """LOGS and ADMIN stop/start MODULE are for admins: others are refused, saying who may."""
    config = write_config(shared_dir, '[daemon]\nsocket_group = "nogroup"\n'
                          '[access]\nadmin_groups = ["adm"]\n')  # fmt: skip
    env = {**daemon_env, "IPAD_SOCKET": str(shared_dir / "run" / "ipad.sock")}
    daemon = start_daemon(config, env=env)
    nogroup, adm = grp.getgrnam("nogroup").gr_gid, grp.getgrnam("adm").gr_gid
    script = (
        "import sys\nfrom ipad.client import BlockingClient, IpadError\n"
        "from ipad.protocol import wire as p\n"
        "with BlockingClient(sys.argv[1]) as c:\n"
        "    try:\n        print(len(c.request(p.Logs(lines=3), p.LogRecords).records))\n"
        "    except IpadError as exc:\n        print(exc.code, exc.message)\n"
        "    for command in ('stop', 'start'):\n"
        "        try:\n            print(c.admin(command, 'echo')['state'])\n"
        "        except IpadError as exc:\n            print(exc.code)\n"
    )
    for groups, expected in (
        ([], ["permission_denied", "permission_denied", "permission_denied"]),
        ([adm], ["3", "stopped", "running"]),
    ):
        child = subprocess.run(
            [*as_user(NOBODY, nogroup, groups), sys.executable, "-c", script, str(daemon.socket)],
            capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
        )  # fmt: skip
        assert child.returncode == 0, child.stderr
        assert [line.split()[0] for line in child.stdout.splitlines()] == expected, child.stdout
    denials = [r["action"] for r in daemon.events("access.denied")]
    assert denials == ["read the daemon's logs", "use the admin operation 'stop'",
                       "use the admin operation 'start'"]  # fmt: skip


@pytest.mark.timeout(120)
def test_stop_of_a_module_whose_worker_is_stuck_in_a_call(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A worker blocked in a call (not reading SHUTDOWN) is stopped within its stop_timeout."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n[modules.stuck]\n'
        '[modules.stuck.restart]\nstop_timeout = "2s"\ncall_timeout = "1min"\n'
        'heartbeat_timeout = "1min"\n'
    )
    daemon = start_daemon(config)
    pid = json.loads(daemon.ctl("--json", "call", "stuck", "pid").stdout)
    mark = tmp_path / "mark"  # not a relative path: that wrote a file into the checkout
    blocked = Follower(daemon, "call", "stuck", "block_beating",
                       json.dumps({"seconds": 60, "mark": str(mark)}))  # fmt: skip
    wait_until(mark.exists)  # the call is in the worker, its loop blocked
    began = time.monotonic()
    assert daemon.ctl("stop", "stuck").stdout == "stuck: stopped\n"
    assert time.monotonic() - began < 2.0 + 3.0  # its stop_timeout, plus a loaded machine's margin
    assert not alive(pid)
    status, stderr = blocked.end(None)
    assert status == 1, stderr
    # The call in flight fails, saying why (PROXY_CAUSE: the reason its proxy turned invalid).
    assert stderr.startswith("ipadctl: stuck worker died during the call: module stuck stopped "
                             "by operator ("), stderr  # fmt: skip
    assert daemon.ctl("start", "stuck").stdout == "stuck: running\n"
