"""Finding a worker executable that is safe to start, after libcamera's IPAProxy::resolvePath."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs
import structlog

from ipad.config.paths import install_dir
from ipad.config.search_path import check_plain_name, dirs_from_env

log = structlog.get_logger("ipad")

#: Extra directories searched for workers after the install and configured ones.
WORKER_PATH_ENV = "IPAD_WORKER_PATH"

#: Write permission for anyone but the owner: any of them could replace the worker.
_UNSAFE_WRITE = stat.S_IWGRP | stat.S_IWOTH

#: The reason a candidate that is simply absent was skipped.
DOES_NOT_EXIST = "does not exist"


@attrs.frozen
class Attempt:
    """One candidate path that was looked at, and why it was not used."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class WorkerNotFound(LookupError):
    """No acceptable worker executable was found; ``attempts`` says where we looked and why not."""

    def __init__(self, name: str, attempts: Iterable[Attempt] = ()) -> None:
        self.name = name
        self.attempts: tuple[Attempt, ...] = tuple(attempts)
        super().__init__(name)

    def __str__(self) -> str:
        if not self.attempts:
            return f"no worker executable {self.name!r} found; no directory to search"
        lines = "".join(f"\n  {attempt}" for attempt in self.attempts)
        return f"no worker executable {self.name!r} found; tried:{lines}"


def resolve_worker(
    name: str,
    *,
    extra_dirs: Sequence[Path] = (),
    environ: Mapping[str, str] | None = None,
    install: Path | None = None,
    privileged: bool | None = None,
) -> Path:
    """Return the first acceptable ``<dir>/<name>``, raising WorkerNotFound listing every try.

    Directories are searched in this order: ``install`` (default: the install
    directory), ``extra_dirs`` (the configuration's ``worker_dirs``, which must
    be absolute), then each entry of $IPAD_WORKER_PATH; a privileged
    (setuid/setgid) process ignores the variable. A candidate is accepted only
    if it is a regular file (symlinks followed) this process may execute,
    neither it nor its directory (both the one it was found in and the one its
    real path is in) is writable by group or others, and the file and those
    directories are owned by root or by this process's effective user.

    The ownership rule is stricter than executability alone: like OpenSSH's
    StrictModes, it holds that whoever owns a file or its directory can swap
    it for another program, so only root or we ourselves may own what we run.
    That is also why checking now and executing later is sound: between the
    two, only root or we could change what the path names. (Directories of
    intermediate links in a chain of symlinks are not checked.)

    The path returned is the one found, not its resolved target, so process
    listings show the name the operator configured.
    """
    check_plain_name(name, "worker")
    for extra in extra_dirs:
        if not extra.is_absolute():
            raise ValueError(f"worker directory {str(extra)!r} must be an absolute path")
    env_dirs = dirs_from_env(WORKER_PATH_ENV, environ, privileged=privileged)
    dirs = _unique([install_dir() if install is None else install, *extra_dirs, *env_dirs])
    attempts: list[Attempt] = []
    for directory in dirs:
        candidate = directory / name
        reason = _rejection(candidate, directory, os.geteuid())
        if reason is None:
            log.debug("worker.resolved", name=name, path=str(candidate))
            return candidate
        if reason != DOES_NOT_EXIST:
            log.warning("worker.candidate_rejected", name=name, path=str(candidate), reason=reason)
        attempts.append(Attempt(candidate, reason))
    raise WorkerNotFound(name, attempts)


def _unique(dirs: Iterable[Path]) -> list[Path]:
    """Keep the first of any repeated directory so no candidate is tried twice."""
    return list(dict.fromkeys(dirs))


def _rejection(candidate: Path, found_in: Path, euid: int) -> str | None:
    """Say why ``candidate`` may not be executed, or return None when it may."""
    try:
        st = candidate.stat()
    except OSError as exc:
        return _stat_failure(candidate, exc)
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_kind(st.st_mode)})"
    if not _executable(candidate):
        return "not executable by this process"
    real_dir = Path(os.path.realpath(candidate)).parent
    return _unsafe("", st, euid) or _unsafe_directories(_unique([real_dir, found_in]), euid)


def _stat_failure(candidate: Path, exc: OSError) -> str:
    """Say why a candidate could not be looked at."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "is a dangling symbolic link" if candidate.is_symlink() else DOES_NOT_EXIST
    return f"cannot be examined: {exc.strerror or exc}"


def _unsafe_directories(directories: Iterable[Path], euid: int) -> str | None:
    """Name the first directory someone else could swap the worker in, if any."""
    for directory in directories:
        try:
            st = directory.stat()
        except OSError as exc:
            return f"directory {directory} cannot be examined: {exc.strerror or exc}"
        problem = _unsafe(f"directory {directory} is ", st, euid)
        if problem is not None:
            return problem
    return None


def _executable(path: Path) -> bool:
    """Ask the kernel with our effective ids, as execve will, where the platform allows."""
    if os.access in os.supports_effective_ids:
        return os.access(path, os.X_OK, effective_ids=True)
    return os.access(path, os.X_OK)


def _unsafe(subject: str, st: os.stat_result, euid: int) -> str | None:
    """Name what lets someone else replace the file or directory ``st`` describes, if anything."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"{subject}writable by others (mode {mode:#o})"
    if mode & stat.S_IWGRP:
        return f"{subject}writable by group (mode {mode:#o})"
    if st.st_uid not in (0, euid):
        return f"{subject}owned by uid {st.st_uid}, not by root or this process's uid {euid}"
    return None


def _kind(mode: int) -> str:
    """Say what sort of file a mode describes, for the rejection message."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    return "an unusual file type"
