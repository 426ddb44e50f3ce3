"""Search directories taken from the environment, read the way glibc's secure_getenv would."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import structlog

log = structlog.get_logger("ipad")

#: Separates the entries of a search-path variable, as in $PATH.
SEPARATOR = ":"

#: Names that would leave a search directory when joined onto it.
_NOT_PLAIN = frozenset({"", ".", ".."})


def is_privileged(
    uid: int | None = None,
    euid: int | None = None,
    gid: int | None = None,
    egid: int | None = None,
) -> bool:
    """Whether this process runs with privileges its invoker does not have (setuid/setgid).

    This is the test glibc's ``secure_getenv`` makes: the environment then
    belongs to a less trusted user and must not choose what we execute or read.
    Each id left out is taken from the running process.
    """
    uid = os.getuid() if uid is None else uid
    euid = os.geteuid() if euid is None else euid
    gid = os.getgid() if gid is None else gid
    egid = os.getegid() if egid is None else egid
    return uid != euid or gid != egid


def secure_getenv(
    variable: str, environ: Mapping[str, str] | None = None, *, privileged: bool | None = None
) -> str | None:
    """Return a variable's non-empty value, or None when it is unset, empty or must be ignored.

    A privileged process ignores the variable and says so, since a silently
    ignored path is hard to debug.
    """
    env = os.environ if environ is None else environ
    value = env.get(variable, "")
    if not value:
        return None
    if is_privileged() if privileged is None else privileged:
        log.warning("search_path.ignored_privileged", variable=variable)
        return None
    return value


def dirs_from_env(
    variable: str, environ: Mapping[str, str] | None = None, *, privileged: bool | None = None
) -> list[Path]:
    """List the absolute directories a colon-separated variable names, in order, each once.

    Empty entries are skipped silently, as $PATH users write ``a::b`` or a
    trailing colon by accident. Relative entries are ignored with a warning:
    they would depend on the daemon's working directory, which an operator
    does not see (the libcamera review asked the same of its proxy path).
    """
    value = secure_getenv(variable, environ, privileged=privileged)
    if value is None:
        return []
    dirs: list[Path] = []
    for entry in value.split(SEPARATOR):
        if not entry:
            continue
        if not entry.startswith("/"):
            log.warning("search_path.relative_entry_ignored", variable=variable, entry=entry)
            continue
        path = Path(entry)
        if path not in dirs:
            dirs.append(path)
    return dirs


def is_plain_name(name: str) -> bool:
    """Whether ``name`` names a file inside a directory it is joined onto, and nothing else.

    Rejects the empty name, ``.``, ``..``, anything with a slash and NUL
    (which no path can hold).
    """
    return name not in _NOT_PLAIN and "/" not in name and "\0" not in name


def check_plain_name(name: str, what: str) -> None:
    """Raise ValueError unless ``name`` is a plain file name; ``what`` says what it names."""
    if not is_plain_name(name):
        raise ValueError(
            f"{what} {name!r} must be a plain file name (not empty, '.' or '..', and no '/')"
        )
