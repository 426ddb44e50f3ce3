"""The ipad and ipadctl commands, run as real processes."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, finish_all

REPO = Path(__file__).resolve().parent.parent

#: Generous: a loaded CI machine may take seconds to start Python and import trio.
PROCESS_TIMEOUT = 30

Start = Callable[..., DaemonProcess]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Python entry point of this checkout and capture its output."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        env=env,
        check=False,
        cwd=REPO,
    )


@pytest.mark.timeout(60)
def test_check_config_accepts_the_shipped_config() -> None:
    """`ipad --check-config config.toml` exits 0 and says so."""
    result = run("-m", "ipad", "--check-config", "config.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.toml: ok")


@pytest.mark.timeout(60)
def test_check_config_prints_every_problem(tmp_path: Path) -> None:
    """A broken config exits 1 and prints one `PATH: key: what (expected)` line per problem."""
    path = tmp_path / "bad.toml"
    path.write_text(
        "[daemon]\nlog_levl = 'info'\n[restart]\nmax_delay = 'forever'\n"
        "[modules.awb]\nenabled = 'yes'\nproxy = 'jail'\n"
    )
    result = run("-m", "ipad", "--check-config", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines == [
        f"{path}: daemon.log_levl: unknown key (did you mean 'log_level'?)",
        (
            f"{path}: restart.max_delay: cannot read duration 'forever' "
            '(a duration such as "10ms", "1.5s" or "2min 30s"; units: us, ms, s, min, h)'
        ),
        f"{path}: modules.awb.enabled: got a string 'yes' (true or false)",
    ]
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_check_config_reports_unknown_proxy_kind(tmp_path: Path) -> None:
    """A module with an unregistered proxy kind fails the check, listing the registered kinds."""
    path = tmp_path / "c.toml"
    path.write_text("[modules.awb]\nproxy = 'jail'\n")
    result = run("-m", "ipad", "--check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: modules.awb.proxy: unknown proxy kind 'jail' (registered: isolated, sandboxed)"
    ]


@pytest.mark.timeout(60)
def test_check_config_missing_file(tmp_path: Path) -> None:
    """A missing config file is one clear line, not a traceback."""
    result = run("-m", "ipad", "--check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{tmp_path / 'nope.toml'}: (file): cannot read:")
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["-m", "ipad"], ["-m", "ipad.cli.ctl"]])
def test_version_and_help(command: list[str]) -> None:
    """Both commands answer --version and --help."""
    version = run(*command, "--version")
    assert version.returncode == 0
    assert version.stdout.strip().endswith("0.1.0")
    helped = run(*command, "--help")
    assert helped.returncode == 0
    assert "usage:" in helped.stdout


@pytest.mark.timeout(60)
def test_ipadctl_without_a_daemon_names_the_socket(tmp_path: Path) -> None:
    """No daemon: exit 1 and the socket it tried, found by $IPAD_SOCKET; as JSON with --json."""
    env = {**os.environ, "IPAD_SOCKET": str(tmp_path / "none.sock")}
    result = run("-m", "ipad.cli.ctl", "status", env=env)
    assert result.returncode == 1
    assert (
        result.stderr
        == f"ipadctl: no daemon at {tmp_path / 'none.sock'}: No such file or directory\n"
    )
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bound:
        bound.bind(str(stale))  # bound, never listening: refused
        result = run("-m", "ipad.cli.ctl", "--json", "--socket", str(stale), "status", env=env)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == {
        "code": "unreachable",
        "message": f"no daemon at {stale}: Connection refused",
        "details": {},
    }


@pytest.mark.timeout(60)
def test_console_scripts_are_installed() -> None:
    """The installed `ipad` and `ipadctl` scripts sit next to this interpreter and run."""
    bindir = Path(sys.executable).parent
    for name in ("ipad", "ipadctl"):
        result = subprocess.run(
            [str(bindir / name), "--version"],
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{name} 0.1.0")


@pytest.fixture
def daemon_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose daemon socket lives in this test's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env["IPAD_SOCKET"] = str(tmp_path / "run" / "ipad.sock")
    return env


@pytest.fixture
def start_daemon(daemon_env: dict[str, str]) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the checkout's config.toml; each daemon must stop cleanly after the test."""
    started: list[DaemonProcess] = []

    def start(config: Path = REPO / "config.toml") -> DaemonProcess:
        # log_level None: the configuration's own, as a user's `ipad --config` has it.
        daemon = DaemonProcess(config, daemon_env, log_level=None)
        started.append(daemon)
        return daemon

    yield start
    finish_all(started)


@pytest.mark.timeout(60)
def test_daemon_binds_socket_and_stops_on_sigterm(
    start_daemon: Start, daemon_env: dict[str, str]
) -> None:
    """The daemon serves a 0660 SEQPACKET socket at $IPAD_SOCKET and removes it on SIGTERM."""
    daemon = start_daemon()
    record = daemon.wait_for("daemon.started")
    path = Path(daemon_env["IPAD_SOCKET"])
    assert record["socket"] == str(path)
    assert (path.stat().st_mode & 0o777) == 0o660
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.connect(str(path))
    probe.close()
    assert daemon.stop() == 0
    assert not path.exists()


@pytest.mark.timeout(60)
def test_daemon_replaces_stale_socket(start_daemon: Start, daemon_env: dict[str, str]) -> None:
    """A socket file left by a dead daemon is replaced."""
    path = Path(daemon_env["IPAD_SOCKET"])
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # bound, never listening: nobody answers
    daemon = start_daemon()
    daemon.wait_for("daemon.started")
    assert daemon.stop() == 0


@pytest.mark.timeout(60)
def test_second_daemon_refuses_live_socket(start_daemon: Start) -> None:
    """A second daemon on the same socket exits 1 and leaves the first one serving."""
    first = start_daemon()
    first.wait_for("daemon.started")
    second = start_daemon()
    record = second.wait_for("daemon.start_failed")
    assert "another daemon is listening" in str(record["error"])
    second.expect_unclean_exit("refuses to start, exit status 1: what is tested")
    assert second.proc.wait(timeout=PROCESS_TIMEOUT) == 1
    assert first.proc.poll() is None
    assert first.stop() == 0


@pytest.mark.timeout(60)
def test_daemon_refuses_to_replace_a_regular_file(
    start_daemon: Start, daemon_env: dict[str, str]
) -> None:
    """A regular file where the socket should be is never deleted."""
    path = Path(daemon_env["IPAD_SOCKET"])
    path.parent.mkdir(parents=True)
    path.write_text("precious")
    daemon = start_daemon()
    daemon.expect_unclean_exit("refuses to start, exit status 1: what is tested")
    record = daemon.wait_for("daemon.start_failed")
    assert "is not a socket" in str(record["error"])
    assert daemon.proc.wait(timeout=PROCESS_TIMEOUT) == 1
    assert path.read_text() == "precious"


@pytest.mark.timeout(60)
def test_daemon_with_invalid_config_exits_1(tmp_path: Path, daemon_env: dict[str, str]) -> None:
    """The daemon does not start on a broken config; it prints the problems and exits 1."""
    path = tmp_path / "c.toml"
    path.write_text("[daemon]\nlog_format = 'xml'\n")
    result = run("-m", "ipad", "--config", str(path), env=daemon_env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: daemon.log_format: got 'xml' (one of 'console', 'json', 'journal')"
    ]


def ctl_with(daemon: DaemonProcess, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ipadctl against ``daemon`` with extra environment (say, a wrong $IPAD_SOCKET)."""
    return subprocess.run(
        daemon.ctl_argv(*args), capture_output=True, text=True, env={**daemon.env, **env},
        timeout=PROCESS_TIMEOUT, check=False,
    )  # fmt: skip


@pytest.mark.timeout(90)
def test_global_options_go_before_or_after_the_subcommand(
    start_daemon: Start, tmp_path: Path
) -> None:
    """--json, --socket and --timeout work before and after any subcommand, alone or mixed."""
    daemon = start_daemon()
    daemon.wait_for("daemon.started")
    sock = str(daemon.socket)
    wrong = {"IPAD_SOCKET": str(tmp_path / "nobody.sock")}  # only --socket can find the daemon
    for argv in (
        ["status", "--json", "--socket", sock],
        ["--json", "status", "--socket", sock],
        ["--socket", sock, "status", "--json"],
        ["--json", "--socket", sock, "--timeout", "10", "status"],
        ["status", "--timeout", "10", "--json", "--socket", sock],
    ):
        result = ctl_with(daemon, *argv, **wrong)
        assert result.returncode == 0, (argv, result.stderr)
        assert json.loads(result.stdout)["modules"]["echo"]["state"] == "running", argv
    for argv in (
        ["call", "echo", "echo", '{"text": "hi"}', "--socket", sock, "--json"],
        ["--json", "call", "echo", "echo", '{"text": "hi"}', "--socket", sock],
        ["--socket", sock, "call", "--timeout", "10", "echo", "echo", '{"text": "hi"}', "--json"],
    ):
        result = ctl_with(daemon, *argv, **wrong)
        assert result.returncode == 0, (argv, result.stderr)
        assert json.loads(result.stdout) == {"text": "hi"}, argv
    described = ctl_with(daemon, "describe", "echo", "--socket", sock, "--json", **wrong)
    assert json.loads(described.stdout)["module"] == "echo", described.stderr
    modules = ctl_with(daemon, "modules", "--json", "--socket", sock, **wrong)
    assert "echo" in json.loads(modules.stdout), modules.stderr
    # Given nowhere, the defaults hold: $IPAD_SOCKET is used, and the output is a table.
    table = daemon.ctl("status")
    assert table.stdout.splitlines()[1].split()[:3] == ["MODULE", "STATE", "PID"]


def subcommands() -> list[str]:
    """Every subcommand ipadctl's parser has."""
    from ipad.cli.ctl import build_parser  # noqa: PLC0415 - the parser under test

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.timeout(120)
def test_every_subcommand_help_says_what_it_does_and_its_exit_status() -> None:
    """`ipadctl SUB --help` prints, for each subcommand, a description with its exit statuses."""
    names = subcommands()
    assert {"status", "restart", "call", "reload", "stop", "events", "keygen"} <= set(names)
    for name in names:
        result = run("-m", "ipad.cli.ctl", name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        text = " ".join(result.stdout.split())
        assert text.startswith(f"usage: ipadctl {name}"), text
        assert "Exit status 0" in text, (name, text)
        for option in ("--json", "--socket", "--timeout"):
            assert option in text, (name, option)


def faulty_config(tmp_path: Path, env: dict[str, str], extra: str = "") -> tuple[Path, Path]:
    """A config with echo and faulty, faulty crashing as it loads while the returned flag exists.

    Faulty cools down after one failure, retried only after an hour: its state stays put.
    """
    flag = tmp_path / "crash"
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    env["IPAD_FAULTY_TUNING_FILE"] = str(tuning)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{REPO / "tests" / "modules"}"]\n'
        "[modules.echo]\n[modules.faulty]\n" + extra + "[modules.faulty.restart]\n"
        'max_failures = 1\ncooldown_interval = "1h"\nstandby = false\n'
    )
    return config, flag


@pytest.mark.timeout(90)
@pytest.mark.parametrize("isolation", ["module", "proxy"])
def test_status_of_a_module_exit_status_uptime_and_last_failure(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], isolation: str
) -> None:
    """`status [MODULE]` exits 3 while one shown is down, 4 if unknown; shows uptime, last failure."""
    config, flag = faulty_config(tmp_path, daemon_env, f'isolation = "{isolation}"\n')
    flag.write_text("")
    daemon = start_daemon(config)
    daemon.wait_for("module.cooldown", lambda r: r["module"] == "faulty")
    everything = daemon.ctl("status", check=False)
    assert everything.returncode == 3, everything.stderr
    echo = daemon.ctl("--json", "status", "echo", check=False)
    assert echo.returncode == 0, echo.stderr
    entry = json.loads(echo.stdout)["modules"]
    assert list(entry) == ["echo"]
    assert entry["echo"]["uptime"] >= 0
    assert entry["echo"]["state_seconds"] >= 0
    assert entry["echo"]["last_failure_reason"] is None
    faulty = daemon.ctl("status", "faulty", "--json", check=False)
    assert faulty.returncode == 3, faulty.stderr
    down = json.loads(faulty.stdout)["modules"]["faulty"]
    assert down["state"] == "cooldown"
    assert down["uptime"] is None
    assert (
        "exit status 7" in down["last_failure_reason"]
        or "before it was ready" in (down["last_failure_reason"])
    )
    assert abs(down["last_failure_at"] - time.time()) < 60
    unknown = daemon.ctl("status", "nope", check=False)
    assert unknown.returncode == 4
    assert unknown.stderr.startswith("ipadctl: no module 'nope'; modules: echo, faulty")
    unknown_json = daemon.ctl("status", "nope", "--json", check=False)
    assert unknown_json.returncode == 4
    assert json.loads(unknown_json.stdout)["error"]["code"] == "unknown_module"
    # Recovered: exit 0, and the REASON column still says what went wrong, and when.
    flag.unlink()
    assert daemon.ctl("restart", "faulty").stdout == "faulty: running\n"
    table = daemon.ctl("status", "faulty", check=False)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[1:3]
    assert header.split() == ["MODULE", "STATE", "PID", "RESTARTS", "PROXIES", "VERSION",
                              "SINCE", "REASON"]  # fmt: skip
    assert row.split()[:2] == ["faulty", "running"]
    assert "last failure" in row, row
    assert "s ago: " in row, row
    up = json.loads(daemon.ctl("--json", "status", "faulty").stdout)["modules"]["faulty"]
    assert up["reason"] is None
    assert up["uptime"] is not None
    assert up["uptime"] >= 0
    assert up["last_failure_reason"] == down["last_failure_reason"]


@pytest.mark.timeout(90)
def test_restart_of_a_module_that_fails_to_load_fails(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """`ipadctl restart` of a module whose load fails prints the failure and exits 1."""
    config, flag = faulty_config(tmp_path, daemon_env)
    daemon = start_daemon(config)
    daemon.wait_for("daemon.started")
    flag.write_text("")
    result = daemon.ctl("restart", "faulty", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    state = result.stdout.strip().removeprefix("faulty: ")
    assert state in ("exited", "backoff", "cooldown", "failed"), result.stdout
    assert result.stderr.startswith("ipadctl: faulty did not start: "), result.stderr
    assert "exit status 7" in result.stderr or "before it was ready" in result.stderr
    as_json = daemon.ctl("--json", "restart", "faulty", check=False)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["state"] != "running"
    unknown = daemon.ctl("restart", "nope", check=False)
    assert unknown.returncode == 4
    assert "no module 'nope'" in unknown.stderr
    flag.unlink()
    assert daemon.ctl("restart", "faulty").returncode == 0
