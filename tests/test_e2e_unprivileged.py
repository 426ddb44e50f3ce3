"""The daemon run by an unprivileged user: CI runs as root, so the other path is shown here.

This machine's Python may live under /root (mode 0700), which another user
cannot enter. Such a test then runs in a private mount namespace where /root
is a world-searchable tmpfs holding bind mounts of just the subtrees needed
(the interpreter, the checkout): the host's /root is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import REPO, DaemonProcess, write_config

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root"),
    pytest.mark.skipif(
        shutil.which("setpriv") is None or shutil.which("unshare") is None,
        reason="needs setpriv and unshare (util-linux)",
    ),
]

#: nobody:nogroup on Debian.
NOBODY = 65534
SETPRIV = (
    shutil.which("setpriv") or "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
)

#: Mount namespace set-up, then the drop to nobody; "$@" is the command to run.
OPEN_ROOT = r"""
set -e
keep=$(mktemp -d)
for sub in $IPAD_TEST_ROOT_SUBTREES; do
  mkdir -p "$keep/$sub"; mount --bind "/root/$sub" "$keep/$sub"
done
mount -t tmpfs -o mode=0755 ipad-test-root /root
for sub in $IPAD_TEST_ROOT_SUBTREES; do
  mkdir -p "/root/$sub"; mount --bind "$keep/$sub" "/root/$sub"
done
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
"""


def root_subtrees() -> list[str]:
    """The entries of /root that the interpreter and the checkout live in."""
    needed = {Path(os.path.realpath(sys.executable)), REPO, Path(sys.prefix), Path(sys.base_prefix)}
    return sorted({p.relative_to("/root").parts[0] for p in needed if p.is_relative_to("/root")})


def as_nobody() -> list[str]:
    """A command prefix that runs the rest as nobody, with /root opened if it must be."""
    if not root_subtrees():
        return list(SETPRIV)
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", OPEN_ROOT, "sh"]


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user owns (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ipad-nobody-"))
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def nobody_env(nobody_dir: Path, daemon_env: dict[str, str]) -> dict[str, str]:
    """The environment of user nobody: a private runtime directory, no IPAD_SOCKET."""
    runtime = nobody_dir / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    env = {k: v for k, v in daemon_env.items() if k != "IPAD_SOCKET"}
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        HOME=str(nobody_dir),
        IPAD_SOCKET="",  # empty: the per-user default applies
        IPAD_TEST_ROOT_SUBTREES=" ".join(root_subtrees()),
    )
    return env


def test_unprivileged_daemon(
    start_daemon: object, nobody_dir: Path, nobody_env: dict[str, str]
) -> None:
    """As nobody: the per-user default socket, workers running as nobody, calls served."""
    daemon: DaemonProcess = start_daemon(  # type: ignore[operator]
        write_config(nobody_dir), env=nobody_env, prefix=as_nobody()
    )
    started = daemon.wait_for("daemon.started")
    socket_path = Path(nobody_env["XDG_RUNTIME_DIR"]) / "ipad" / "ipad.sock"
    assert started["socket"] == str(socket_path)
    assert started["modules"] == {"awb": "running", "agc": "running", "echo": "running"}
    assert socket_path.stat().st_uid == NOBODY
    assert (socket_path.stat().st_mode & 0o777) == 0o660
    assert (socket_path.parent.stat().st_mode & 0o777) == 0o700
    for pid in daemon.worker_pids().values():
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(NOBODY)] * 4
    reply = daemon.ctl("--json", "call", "echo", "echo", '{"text": "as nobody"}')
    assert json.loads(reply.stdout) == {"text": "as nobody"}


def test_check_config_names_an_interpreter_nobody_can_run(nobody_dir: Path) -> None:
    """If the interpreter is out of the user's reach, --check-config says so for each module."""
    if not root_subtrees() or (Path("/root").stat().st_mode & 0o001):
        pytest.skip("this machine's interpreter is reachable by every user")
    config = write_config(nobody_dir)
    result = subprocess.run(
        [*SETPRIV, sys.executable, "-m", "ipad", "--check-config", str(config)],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"modules.echo.worker: the Python interpreter {sys.executable} is not executable" in (
        result.stderr
    )
