"""Tests for worker executable resolution and its safety checks."""

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
from structlog.testing import capture_logs

from ipad.config.paths import install_dir
from ipad.config.resolve import WORKER_PATH_ENV, Attempt, WorkerNotFound, resolve_worker

from .helpers_fs import make_dir, write_executable
from .privileges import NOBODY, needs_setpriv, with_ids

NAME = "ipad-worker"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three empty, safe directories: the install dir, a configured one and one for the env."""
    return (
        make_dir(tmp_path / "install"),
        make_dir(tmp_path / "configured"),
        make_dir(tmp_path / "env"),
    )


def _reasons(install: Path) -> list[str]:
    """Resolve with only ``install`` to search and return the rejection reasons."""
    with pytest.raises(WorkerNotFound) as info:
        resolve_worker(NAME, install=install, environ={}, privileged=False)
    return [attempt.reason for attempt in info.value.attempts]


def test_install_dir_is_searched_first(dirs: tuple[Path, Path, Path]) -> None:
    """A worker in the install directory wins over configured and environment ones."""
    install, configured, env = dirs
    for directory in dirs:
        write_executable(directory / NAME)
    found = resolve_worker(
        NAME,
        install=install,
        extra_dirs=[configured],
        environ={WORKER_PATH_ENV: str(env)},
        privileged=False,
    )
    assert found == install / NAME


def test_configured_dirs_come_before_the_environment(dirs: tuple[Path, Path, Path]) -> None:
    """Without an installed worker, a configured directory wins over $IPAD_WORKER_PATH."""
    install, configured, env = dirs
    write_executable(configured / NAME)
    write_executable(env / NAME)
    found = resolve_worker(
        NAME,
        install=install,
        extra_dirs=[configured],
        environ={WORKER_PATH_ENV: str(env)},
        privileged=False,
    )
    assert found == configured / NAME


def test_environment_entries_are_searched_in_order(tmp_path: Path) -> None:
    """The first $IPAD_WORKER_PATH entry holding an acceptable worker wins."""
    install, first, second = (make_dir(tmp_path / n) for n in ("install", "first", "second"))
    write_executable(first / NAME)
    write_executable(second / NAME)
    environ = {WORKER_PATH_ENV: f"{second}:{first}"}
    found = resolve_worker(NAME, install=install, environ=environ, privileged=False)
    assert found == second / NAME


def test_resolved_worker_is_logged_at_debug(dirs: tuple[Path, Path, Path]) -> None:
    """Resolution logs the name and the path chosen."""
    install, _, _ = dirs
    write_executable(install / NAME)
    with capture_logs() as logs:
        resolve_worker(NAME, install=install, environ={}, privileged=False)
    assert logs == [
        {
            "event": "worker.resolved",
            "name": NAME,
            "path": str(install / NAME),
            "log_level": "debug",
        }
    ]


def test_install_dir_defaults_to_the_shipped_one() -> None:
    """Without ``install`` the first directory searched is ipad's install directory."""
    with pytest.raises(WorkerNotFound) as info:
        resolve_worker("no-such-worker-anywhere", environ={}, privileged=False)
    assert info.value.attempts[0].path == install_dir() / "no-such-worker-anywhere"


def test_missing_candidate_does_not_exist(dirs: tuple[Path, Path, Path]) -> None:
    """An absent file is rejected as not existing."""
    assert _reasons(dirs[0]) == ["does not exist"]


def test_directory_is_not_a_regular_file(dirs: tuple[Path, Path, Path]) -> None:
    """A directory of the worker's name is rejected as not a regular file."""
    make_dir(dirs[0] / NAME)
    assert _reasons(dirs[0]) == ["not a regular file (a directory)"]


def test_fifo_is_not_a_regular_file(dirs: tuple[Path, Path, Path]) -> None:
    """A FIFO of the worker's name is rejected as not a regular file."""
    os.mkfifo(dirs[0] / NAME, 0o755)
    assert _reasons(dirs[0]) == ["not a regular file (a FIFO)"]


def test_non_executable_file_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A file without execute permission for this process is rejected."""
    write_executable(dirs[0] / NAME, mode=0o644)
    assert _reasons(dirs[0]) == ["not executable by this process"]


def test_world_writable_file_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A file anyone may write is rejected, showing its mode."""
    write_executable(dirs[0] / NAME, mode=0o777)
    assert _reasons(dirs[0]) == ["writable by others (mode 0o777)"]


def test_group_writable_file_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A file its group may write is rejected, showing its mode."""
    write_executable(dirs[0] / NAME, mode=0o775)
    assert _reasons(dirs[0]) == ["writable by group (mode 0o775)"]


def test_group_writable_directory_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A good file in a directory its group may write is rejected, naming the directory."""
    install = dirs[0]
    write_executable(install / NAME)
    install.chmod(0o775)
    assert _reasons(install) == [f"directory {install} is writable by group (mode 0o775)"]


def test_sticky_world_writable_directory_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A /tmp-like directory is rejected although its sticky bit guards existing files."""
    install = dirs[0]
    write_executable(install / NAME)
    install.chmod(0o1777)
    assert _reasons(install) == [f"directory {install} is writable by others (mode 0o1777)"]


@needs_root
def test_file_owned_by_another_user_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A file owned by neither root nor us is rejected, since its owner could swap it."""
    worker = write_executable(dirs[0] / NAME)
    os.chown(worker, NOBODY, NOBODY)
    assert _reasons(dirs[0]) == [
        f"owned by uid {NOBODY}, not by root or this process's uid {os.geteuid()}"
    ]


@needs_root
def test_directory_owned_by_another_user_is_rejected(dirs: tuple[Path, Path, Path]) -> None:
    """A directory owned by neither root nor us is rejected, since its owner could swap the file."""
    install = dirs[0]
    write_executable(install / NAME)
    os.chown(install, NOBODY, NOBODY)
    uid = os.geteuid()
    assert _reasons(install) == [
        f"directory {install} is owned by uid {NOBODY}, not by root or this process's uid {uid}"
    ]


def test_symlink_to_a_good_file_is_accepted_under_its_own_name(tmp_path: Path) -> None:
    """A symlink to an acceptable worker is accepted and returned as found, not resolved."""
    real = write_executable(make_dir(tmp_path / "real") / "worker-1.2")
    install = make_dir(tmp_path / "install")
    (install / NAME).symlink_to(real)
    assert resolve_worker(NAME, install=install, environ={}, privileged=False) == install / NAME


def test_symlink_into_a_writable_directory_is_rejected(tmp_path: Path) -> None:
    """The directory of a symlink's target is checked too, not only the one it was found in."""
    target_dir = make_dir(tmp_path / "shared", mode=0o777)
    target_dir.chmod(0o777)
    real = write_executable(target_dir / "worker")
    install = make_dir(tmp_path / "install")
    (install / NAME).symlink_to(real)
    assert _reasons(install) == [f"directory {target_dir} is writable by others (mode 0o777)"]


def test_dangling_symlink_is_named_as_such(dirs: tuple[Path, Path, Path]) -> None:
    """A symlink to nothing is reported as dangling rather than as absent."""
    (dirs[0] / NAME).symlink_to(dirs[0] / "gone")
    assert _reasons(dirs[0]) == ["is a dangling symbolic link"]


def test_rejected_candidate_is_skipped_with_a_warning(dirs: tuple[Path, Path, Path]) -> None:
    """A present but unsafe candidate is logged and the search goes on to the next directory."""
    install, configured, _ = dirs
    write_executable(install / NAME, mode=0o777)
    write_executable(configured / NAME)
    with capture_logs() as logs:
        found = resolve_worker(
            NAME, install=install, extra_dirs=[configured], environ={}, privileged=False
        )
    assert found == configured / NAME
    assert logs[0] == {
        "event": "worker.candidate_rejected",
        "name": NAME,
        "path": str(install / NAME),
        "reason": "writable by others (mode 0o777)",
        "log_level": "warning",
    }


def test_not_found_lists_every_path_and_reason(dirs: tuple[Path, Path, Path]) -> None:
    """The error names each candidate tried, in order, with why it was refused."""
    install, configured, env = dirs
    write_executable(configured / NAME, mode=0o777)
    make_dir(env / NAME)
    with pytest.raises(WorkerNotFound) as info:
        resolve_worker(
            NAME,
            install=install,
            extra_dirs=[configured],
            environ={WORKER_PATH_ENV: f"{env}:{install}"},
            privileged=False,
        )
    error = info.value
    assert error.name == NAME
    assert error.attempts == (
        Attempt(install / NAME, "does not exist"),
        Attempt(configured / NAME, "writable by others (mode 0o777)"),
        Attempt(env / NAME, "not a regular file (a directory)"),
    )
    assert str(error) == (
        f"no worker executable {NAME!r} found; tried:\n"
        f"  {install / NAME}: does not exist\n"
        f"  {configured / NAME}: writable by others (mode 0o777)\n"
        f"  {env / NAME}: not a regular file (a directory)"
    )
    assert isinstance(error, LookupError)


def test_privileged_process_ignores_the_environment(dirs: tuple[Path, Path, Path]) -> None:
    """A setuid or setgid process never runs a worker found through $IPAD_WORKER_PATH."""
    install, _, env = dirs
    write_executable(env / NAME)
    with capture_logs() as logs, pytest.raises(WorkerNotFound) as info:
        resolve_worker(NAME, install=install, environ={WORKER_PATH_ENV: str(env)}, privileged=True)
    assert [a.path for a in info.value.attempts] == [install / NAME]
    assert logs[0]["event"] == "search_path.ignored_privileged"


@pytest.mark.parametrize("name", ["", ".", "..", "bin/ipad-worker", "/usr/bin/true", "a\0b"])
def test_invalid_worker_names_are_refused(name: str, dirs: tuple[Path, Path, Path]) -> None:
    """A worker name that is not a plain file name raises ValueError before any search."""
    with pytest.raises(ValueError, match="must be a plain file name"):
        resolve_worker(name, install=dirs[0], environ={}, privileged=False)


def test_relative_configured_dir_is_refused(dirs: tuple[Path, Path, Path]) -> None:
    """Configured directories must already be absolute."""
    with pytest.raises(ValueError, match="must be an absolute path"):
        resolve_worker(NAME, install=dirs[0], extra_dirs=[Path("workers")], environ={})


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """Make a real directory another user can enter.

    pytest's own temporary root is private to us (mode 0700), so a process
    that dropped to another user could not reach anything under tmp_path.
    """
    path = Path(tempfile.mkdtemp(prefix="ipad-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


#: Run in the subprocess: resolve the worker and report the outcome as JSON.
_PROBE = """
import json, os, sys
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from ipad.config.resolve import WorkerNotFound, resolve_worker
try:
    found = str(resolve_worker("ipad-worker", install=Path(sys.argv[1])))
    attempts = []
except WorkerNotFound as exc:
    found = None
    attempts = [[str(a.path), a.reason] for a in exc.attempts]
print(json.dumps({"ids": [os.getuid(), os.geteuid()], "found": found, "attempts": attempts}))
"""


def _probe(setpriv_args: list[str], install: Path, worker_path: str) -> dict[str, object]:
    """Run the probe with the given setpriv ids (on ipad as that user finds it); what it reported."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", WORKER_PATH_ENV: worker_path}
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    as_them = with_ids([setpriv, *setpriv_args, "--clear-groups"])
    result = subprocess.run(
        [*as_them, sys.executable, "-c", _PROBE, str(install)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


@needs_root
@needs_setpriv
@pytest.mark.timeout(30)
def test_unprivileged_process_checks_execute_permission_as_itself(shared_tmp: Path) -> None:
    """Dropped to nobody, a root-only executable is refused and $IPAD_WORKER_PATH is honoured."""
    install = make_dir(shared_tmp / "install")
    root_only = write_executable(install / NAME, mode=0o744)
    env_dir = make_dir(shared_tmp / "env")
    write_executable(env_dir / NAME)
    # The same root-only file is fine for root, so the refusal below is the dropped user's.
    assert resolve_worker(NAME, install=install, environ={}, privileged=False) == root_only
    ids = f"--reuid={NOBODY}", f"--regid={NOBODY}"
    report = _probe([*ids], install, str(env_dir))
    assert report == {"ids": [NOBODY, NOBODY], "found": str(env_dir / NAME), "attempts": []}
    report = _probe([*ids], install, "")
    assert report["attempts"] == [[str(root_only), "not executable by this process"]]


@needs_root
@needs_setpriv
@pytest.mark.timeout(30)
def test_setuid_like_process_ignores_the_environment(shared_tmp: Path) -> None:
    """A process whose real and effective uid differ, as a setuid one's do, ignores the variable."""
    install = make_dir(shared_tmp / "install")
    env_dir = make_dir(shared_tmp / "env")
    write_executable(env_dir / NAME)
    ids = ["--ruid=0", f"--euid={NOBODY}", "--rgid=0", f"--egid={NOBODY}"]
    report = _probe(ids, install, str(env_dir))
    assert report == {
        "ids": [0, NOBODY],
        "found": None,
        "attempts": [[str(install / NAME), "does not exist"]],
    }
