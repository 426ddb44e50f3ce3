"""sd_notify and socket activation: the pure parsing, and real sockets and processes."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipad.daemon.systemd import (
    ActivationError,
    ListenFd,
    Notifier,
    describe_error,
    listening_socket,
    monotonic_usec,
    notify_address,
    notify_message,
    parse_listen_fds,
    take_listen_fds,
    take_watchdog_usec,
)

# --- socket activation: the environment -----------------------------------------


def test_no_listen_pid_means_no_activation() -> None:
    """Without LISTEN_PID nothing was passed, whatever else is set."""
    assert parse_listen_fds({"LISTEN_FDS": "1"}, pid=10) == []


def test_listen_fds_for_another_process_are_ignored() -> None:
    """Variables inherited from a parent they were meant for pass nothing to us."""
    env = {"LISTEN_PID": "11", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ipad.socket"}
    assert parse_listen_fds(env, pid=10) == []


def test_listen_fds_start_at_three_with_their_names() -> None:
    """Descriptors 3, 4, ... carry the names from LISTEN_FDNAMES in order."""
    env = {"LISTEN_PID": "10", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ipad.socket:extra"}
    assert parse_listen_fds(env, pid=10) == [ListenFd(3, "ipad.socket"), ListenFd(4, "extra")]


def test_listen_fds_without_names_are_unknown() -> None:
    """An older systemd passes no names: each is 'unknown', as sd_listen_fds_with_names says."""
    assert parse_listen_fds({"LISTEN_PID": "10", "LISTEN_FDS": "1"}, pid=10) == [
        ListenFd(3, "unknown")
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "x"}, "LISTEN_PID='x' is not a process id"),
        ({"LISTEN_PID": "10", "LISTEN_FDS": "one"}, "LISTEN_FDS='one' is not a number"),
        ({"LISTEN_PID": "10", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a number"),
        (
            {"LISTEN_PID": "10", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES names 2 descriptors but LISTEN_FDS says 1",
        ),
    ],
)
def test_malformed_listen_variables_are_clear_errors(env: dict[str, str], message: str) -> None:
    """Each malformed variable is named with its value."""
    with pytest.raises(ActivationError, match=message):
        parse_listen_fds(env, pid=10)


def test_take_listen_fds_unsets_the_variables_even_when_not_ours() -> None:
    """Whatever they said, the variables are gone afterwards: no worker inherits them."""
    env = {"LISTEN_PID": "11", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert take_listen_fds(env, pid=10) == []
    assert env == {"OTHER": "kept"}
    env = {"LISTEN_PID": "x"}
    with pytest.raises(ActivationError):
        take_listen_fds(env, pid=10)
    assert env == {}


# --- socket activation: the passed socket, in a real child process ------------------

#: Run in a child whose fd 3 is the passed socket: report what ipad makes of it.
CHILD = """
import json, os, socket, sys
from ipad.daemon.systemd import ActivationError, listening_socket, socket_name, take_listen_fds
try:
    sock = listening_socket(take_listen_fds())
except ActivationError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
    print(json.dumps({"path": socket_name(sock) if sock else None,
                      "cloexec": not os.get_inheritable(3) if sock else None, "left": left}))
"""


def run_activated(sock: socket.socket | None, count: int = 1, names: str | None = None) -> object:
    """Run CHILD as systemd would: the socket on fd 3, LISTEN_PID set to the child's own pid."""
    fds: list[int] = []
    script = 'export LISTEN_PID=$$; exec "$0" -c "$1"'
    if sock is not None:
        script = f"exec 3<&{sock.fileno()}; {script}"
        fds = [sock.fileno()]
    env = {**os.environ, "LISTEN_FDS": str(count)}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    result = subprocess.run(
        ["/bin/bash", "-c", script, sys.executable, CHILD],
        pass_fds=fds, env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(f"/tmp/ipad-t-{secrets.token_hex(4)}")
    path.mkdir(mode=0o700)
    yield str(path)
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


@pytest.mark.timeout(30)
def test_a_passed_seqpacket_listener_is_taken(short_dir: str) -> None:
    """A listening SOCK_SEQPACKET socket on fd 3 is served, close-on-exec, variables unset."""
    path = f"{short_dir}/ipad.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(path)
        sock.listen()
        assert run_activated(sock, names="ipad.socket") == {
            "path": path, "cloexec": True, "left": [],
        }  # fmt: skip


def stream_listener() -> socket.socket:
    """What ListenStream= would pass."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("")  # an abstract name of the kernel's choosing
    sock.listen()
    return sock


def tcp_listener() -> socket.socket:
    """What ListenStream=127.0.0.1:PORT would pass."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def unlistened() -> socket.socket:
    """A SEQPACKET socket nobody listens on (one end of a pair, as Accept=yes would pass)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    return ours


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (
            stream_listener,
            "is a SOCK_STREAM socket, not SOCK_SEQPACKET: use ListenSequentialPacket=",
        ),
        (tcp_listener, "is an AF_INET socket, not AF_UNIX: use ListenSequentialPacket=PATH"),
        (
            unlistened,
            "is not listening (is Accept=yes set in the socket unit? ipad needs Accept=no)",
        ),
    ],
    ids=["stream", "inet", "not-listening"],
)
def test_a_socket_of_the_wrong_kind_is_refused(
    make: Callable[[], socket.socket], problem: str
) -> None:
    """Each wrong socket is refused, saying what the socket unit should say instead."""
    with make() as sock:
        result = run_activated(sock, names="ipad.socket")
    assert result == {"error": f"fd 3 (ipad.socket) from LISTEN_FDS {problem}"}


@pytest.mark.timeout(30)
def test_a_missing_descriptor_is_refused() -> None:
    """LISTEN_FDS=1 with nothing on fd 3 says the descriptor is not open."""
    result = run_activated(None, names="ipad.socket")
    assert result == {
        "error": "fd 3 (ipad.socket) from LISTEN_FDS is not open: Bad file descriptor"
    }


def test_more_than_one_socket_is_refused() -> None:
    """One socket is served; several are refused before any is touched."""
    with pytest.raises(ActivationError, match=r"systemd passed 2 descriptors \(fd 3 \(a\), fd 4"):
        listening_socket([ListenFd(3, "a"), ListenFd(4, "b")])


def test_no_descriptors_means_no_socket() -> None:
    """Without activation there is no inherited socket: the daemon binds its own."""
    assert listening_socket([]) is None


# --- notification -------------------------------------------------------------------


def test_notify_message_is_key_value_lines() -> None:
    """Fields become KEY=value lines; a newline in a value cannot split a field."""
    assert notify_message({"READY": 1, "STATUS": "a\nb"}) == b"READY=1\nSTATUS=a b\n"
    with pytest.raises(ValueError, match="not a notification variable"):
        notify_message({"ready": 1})


def test_notify_address_forms() -> None:
    """A path, or '@' for Linux's abstract namespace; anything else is not ours to reach."""
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@ipad-notify") == "\0ipad-notify"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("@") is None


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, standing where systemd's would be."""
    name = f"@ipad-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(5)
    yield sock, name
    sock.close()


def test_notifier_sends_one_datagram_and_takes_the_variable(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """$NOTIFY_SOCKET is read once and unset; each notify is one datagram."""
    sock, name = notify_socket
    env = {"NOTIFY_SOCKET": name}
    notifier = Notifier.from_environment(env)
    try:
        assert env == {}
        assert notifier.enabled
        assert notifier.send(notify_message({"READY": 1, "STATUS": "3 modules valid"}))
        assert sock.recv(4096) == b"READY=1\nSTATUS=3 modules valid\n"
    finally:
        notifier.close()


def test_notifier_without_a_manager_does_nothing() -> None:
    """Outside systemd a notification is a no-op that reports it was not sent."""
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.send(b"READY=1\n")


def test_notifier_raises_what_sendto_raises(short_dir: str) -> None:
    """A manager that went away is the sender's OSError, described by its errno name."""
    notifier = Notifier(f"{short_dir}/gone")
    try:
        with pytest.raises(FileNotFoundError) as raised:
            notifier.send(b"WATCHDOG=1\n")
        assert describe_error(raised.value) == "ENOENT: No such file or directory"
    finally:
        notifier.close()


def test_monotonic_usec_is_clock_monotonic() -> None:
    """MONOTONIC_USEC uses the clock systemd compares it with (CLOCK_MONOTONIC, in µs)."""
    before = time.monotonic_ns() // 1000
    stamp = monotonic_usec()
    assert before <= stamp <= time.monotonic_ns() // 1000


# --- watchdog --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "3000000"}, 3_000_000),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "10"}, 3_000_000),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "11"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_is_ours_only_when_its_pid_matches(
    env: dict[str, str], expected: int | None
) -> None:
    """WATCHDOG_USEC applies to us unless WATCHDOG_PID names another process; both are unset."""
    assert take_watchdog_usec(env, pid=10) == expected
    assert env == {}
