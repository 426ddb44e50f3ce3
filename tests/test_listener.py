"""The listening socket: only in a directory nobody else can write, mode 0660, its group set."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ipad.daemon.listener import UnsafeDirectory, bind_listener, check_inherited, directory_problems
from tests.daemon_process import REPO
from tests.privileges import NOBODY, needs_setpriv

#: A group id for the socket (any id will do for root's chown).
GROUP = 4242


def mode(path: Path) -> int:
    """A file's permission bits."""
    return stat.S_IMODE(path.stat().st_mode)


def test_a_private_directory_is_safe(tmp_path: Path) -> None:
    """A directory of the daemon's own user, writable by it alone, under a sticky /tmp."""
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    assert directory_problems(private) == []


@pytest.mark.parametrize(
    ("bits", "problem"),
    [
        (0o777, "is writable by others (mode 0777)"),
        (0o770, "is writable by its group (mode 0770)"),
        (0o1777, "is writable by others (mode 1777)"),
    ],
)
def test_a_directory_others_can_write_is_not(tmp_path: Path, bits: int, problem: str) -> None:
    """Writable by group or others, even sticky like /tmp: someone else could replace the socket."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(bits)
    assert directory_problems(shared) == [f"{shared} {problem}"]


def test_a_parent_others_can_write_is_not_unless_sticky(tmp_path: Path) -> None:
    """Above the socket's directory, others' write access is fine only with the sticky bit."""
    parent = tmp_path / "parent"
    (parent / "run").mkdir(parents=True, mode=0o700)
    parent.chmod(0o777)
    assert directory_problems(parent / "run") == [f"{parent} is writable by others (mode 0777)"]
    parent.chmod(0o1777)
    assert directory_problems(parent / "run") == []


@needs_setpriv
def test_a_directory_of_another_user_is_not(tmp_path: Path) -> None:
    """Owned by anyone but root or the daemon's user: that user could swap the socket."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    assert directory_problems(theirs) == [f"{theirs} belongs to uid {NOBODY}"]
    assert directory_problems(theirs, euid=NOBODY) == []


def test_the_daemon_refuses_an_unsafe_directory(tmp_path: Path) -> None:
    """bind_listener creates nothing in a directory others can write, and says what to use."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeDirectory) as info:
        bind_listener(shared / "ipad.sock")
    assert str(info.value) == (
        f"refusing to create the socket {shared}/ipad.sock: {shared} is writable by others "
        f"(mode 0777). Use a directory that only root or uid {os.geteuid()} can write, in a "
        "path only they can change (such as $XDG_RUNTIME_DIR/ipad, or /run/ipad for root)"
    )
    assert list(shared.iterdir()) == []


def test_the_socket_is_0660_and_private_directories_0700(tmp_path: Path) -> None:
    """Without a socket group: a new directory only the daemon can enter, the socket 0660."""
    path = tmp_path / "new" / "ipad.sock"
    with bind_listener(path):
        assert mode(path.parent) == 0o700
        assert mode(path) == 0o660
        assert stat.S_ISSOCK(path.lstat().st_mode)


@needs_setpriv
def test_the_socket_group(tmp_path: Path) -> None:
    """With socket_group: socket and new directory belong to the group, which can reach it."""
    path = tmp_path / "new" / "ipad.sock"
    with bind_listener(path, GROUP):
        assert (path.stat().st_gid, mode(path)) == (GROUP, 0o660)
        assert (path.parent.stat().st_gid, mode(path.parent)) == (GROUP, 0o750)


def test_an_existing_closed_directory_is_warned_about(tmp_path: Path) -> None:
    """The socket group cannot reach a socket in an existing 0700 directory: said once at start."""
    path = tmp_path / "ipad.sock"
    with capture_logs() as logs, bind_listener(path, os.getgid()):
        pass
    closed = [entry for entry in logs if entry["event"] == "socket.directory_closed"]
    assert closed == [{**closed[0], "directory": str(tmp_path), "mode": "0700"}]


def test_an_inherited_socket_anyone_can_use_is_warned_about(tmp_path: Path) -> None:
    """Socket activation: the unit sets the mode; a world-accessible socket gets a warning."""
    path = tmp_path / "run" / "ipad.sock"
    path.parent.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(str(path))
        path.chmod(0o666)
        with capture_logs() as logs:
            check_inherited(path)
        path.chmod(0o660)
        with capture_logs() as quiet:
            check_inherited(path)
    assert [(e["event"], e["mode"]) for e in logs] == [("socket.world_accessible", "0666")]
    assert quiet == []


@pytest.mark.timeout(60)
def test_the_daemon_exits_on_an_unsafe_directory(
    tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """The real daemon: exit status 1 and daemon.start_failed naming the directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    config = tmp_path / "c.toml"
    config.write_text("[modules.echo]\n")
    env = {**daemon_env, "IPAD_SOCKET": str(shared / "ipad.sock")}
    result = subprocess.run(
        [sys.executable, "-m", "ipad", "--config", str(config), "--log-format", "json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=50, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"{shared} is writable by others (mode 0777)" in result.stderr
    assert "daemon.start_failed" in result.stderr
