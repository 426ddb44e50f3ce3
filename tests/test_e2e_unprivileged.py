"""The daemon run by an unprivileged user: CI runs as root, so the other path is shown here."""

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
from tests.privileges import (
    NOBODY,
    as_user,
    interpreter_subtrees,
    needs_setpriv,
    setpriv,
    user_install,
)

pytestmark = [pytest.mark.timeout(60), needs_setpriv]


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
        # The test modules' tuning files as nobody can read them, not the checkout's.
        IPAD_CONFIG_PATH=str(user_install().test_modules / "tuning"),
    )
    return env


#: What the user's interpreter runs from.
WHERE = """
import json, os, sys
import ipad, structlog, trio
from ipad.config.paths import install_dir
print(json.dumps({
    "uid": os.getuid(), "executable": sys.executable, "prefix": sys.prefix,
    "base_prefix": sys.base_prefix, "path": sys.path, "install_dir": str(install_dir()),
    **{m.__name__: m.__file__ for m in (ipad, structlog, trio)},
}))
"""


def test_another_user_runs_the_install_not_the_checkout() -> None:
    """As nobody, our interpreter's command runs ipad from the session's install, never the checkout.

    So these tests pass wherever the checkout is, also in a directory only root may enter.
    """
    install = user_install()
    result = subprocess.run(
        [*as_user(), sys.executable, "-c", WHERE],
        capture_output=True, text=True, timeout=30, check=True, cwd=REPO,
    )  # fmt: skip
    where = json.loads(result.stdout)
    assert where["uid"] == NOBODY
    assert where["executable"] == str(install.python)
    assert where["prefix"] == str(install.prefix)
    # Our interpreter's own standard library, not the system's that the loader might fall back to.
    assert where["base_prefix"] == sys.base_prefix
    for module in ("ipad", "trio", "structlog"):
        assert Path(where[module]).is_relative_to(install.site_packages), where
    assert where["install_dir"] == str(install.prefix / "share" / "ipad" / "workers")
    assert not any(Path(p).is_relative_to(REPO) for p in where["path"] if p), where["path"]


def test_unprivileged_daemon(
    start_daemon: object, nobody_dir: Path, nobody_env: dict[str, str]
) -> None:
    """As nobody: the per-user default socket, workers running as nobody, calls served."""
    daemon: DaemonProcess = start_daemon(  # type: ignore[operator]
        write_config(nobody_dir), env=nobody_env, prefix=as_user()
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
    if not interpreter_subtrees() or (Path("/root").stat().st_mode & 0o001):
        pytest.skip("this machine's interpreter is reachable by every user")
    config = write_config(nobody_dir)
    # setpriv alone, without as_user's namespace: the interpreter stays out of reach. It
    # still starts (setpriv execs it with root's capabilities) on the system's libraries.
    python = user_install().python
    result = subprocess.run(
        [*setpriv(), python, "-m", "ipad", "--check-config", str(config)],
        capture_output=True, text=True, timeout=30, check=False, cwd=user_install().root,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"modules.echo.worker: the Python interpreter {python} is not executable" in (
        result.stderr
    )
