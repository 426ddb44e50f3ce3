"""A module's code identity: which code a worker loaded, and whether the disk still holds it.

What is hashed: the manifest file and every file of the entry point's
top-level package (or its single ``<top>.py``), ``__pycache__`` excepted --
the very files a module signature covers (ipad/config/signing.py lists them
with ``code_files`` from here). The identity is ``sha256:`` and the first 16
hex digits of the SHA-256 over each file's relative path and the SHA-256 of
its contents, in path order.

Cheap on the restart path: each walk stats the files (size, mtime, ctime,
inode: their *fingerprint*) and the contents are hashed again only when the
fingerprint moved since the last walk. A walk is bounded (``MAX_FILES``,
``MAX_BYTES``, ``MAX_DEPTH``, ``MAX_ENTRIES``): a module past a bound has no identity
(``CodeTooLarge`` says which bound and where), rather than a daemon that
spends seconds reading a hostile tree at each restart.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import attrs

from ipad.config.manifest import ModuleSource

#: Never part of a module's code: compiled caches change without the code changing.
SKIPPED_DIRS = frozenset({"__pycache__"})
#: Files one module's code may have (its package, walked recursively, and the manifest).
MAX_FILES = 2048
#: Bytes those files may hold between them.
MAX_BYTES = 64 * 1024 * 1024
#: Directory levels below the package.
MAX_DEPTH = 16
#: Directory entries the walk looks at, of every kind: empty directories, FIFOs and
#: dangling links are no code, but each costs a stat (100 000 of them took 1.3 s).
MAX_ENTRIES = 4 * MAX_FILES

#: A file's fingerprint: (path relative to the module directory, size, mtime, ctime, inode).
Stamp = tuple[str, int, int, int, int]

#: SHA-256 of file contents by (absolute path, size, mtime, ctime, inode), shared by every
#: module: 200 modules of one package read each of its files once. Bounded: cleared whole
#: when full (a daemon's modules have a few thousand files at most).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_DIGESTS_MAX = 8192


class CodeTooLarge(ValueError):
    """A module's code is past a bound of the walk: it has no identity."""


@attrs.frozen
class Identity:
    """A module's code as found on disk by one walk."""

    #: ``sha256:`` + 16 hex digits over the manifest and package files.
    code_id: str
    #: The same over the package files alone (what a fork server preloads).
    package_id: str
    fingerprint: tuple[Stamp, ...]


def entry_top(source: ModuleSource) -> str | None:
    """The top-level package or module name of the manifest's entry point (None: none)."""
    entry = source.manifest.entry_point
    return entry.partition(":")[0].split(".")[0] if entry else None


def code_files(
    directory: Path, top: str | None, *, limit: bool = True
) -> list[tuple[Path, os.stat_result]]:
    """The files of package (or module) ``top`` in ``directory``, sorted, each with its stat.

    Directory symlinks are not followed (as ``Path.rglob``); ``limit`` applies
    the bounds, raising CodeTooLarge past one.
    """
    if top is None:
        return []
    package = directory / top
    if _stat(package, stat.S_ISDIR) is None:
        single = directory / f"{top}.py"
        info = _stat(single, stat.S_ISREG)
        return [(single, info)] if info is not None else []
    files = _walk(package, limit)
    files.sort(key=lambda found: str(found[0]))  # as the relative names sort
    return files


def _stat(path: Path, kind: Callable[[int], bool]) -> os.stat_result | None:
    """``path``'s stat if it exists and is of ``kind`` (links followed)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info if kind(info.st_mode) else None


def _walk(package: Path, limit: bool) -> list[tuple[Path, os.stat_result]]:
    files: list[tuple[Path, os.stat_result]] = []
    total = 0
    seen = 0
    pending: list[tuple[str, int]] = [(str(package), 0)]
    while pending:
        where, depth = pending.pop()
        if limit and depth > MAX_DEPTH:
            raise CodeTooLarge(f"{where}: deeper than {MAX_DEPTH} directory levels")
        try:
            entries = list(_entries(where, MAX_ENTRIES - seen if limit else None))
        except OSError:
            continue  # unreadable: the worker cannot import from it either
        seen += len(entries)
        if limit and seen > MAX_ENTRIES:
            raise CodeTooLarge(f"{package}: more than {MAX_ENTRIES} directory entries")
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED_DIRS:
                    pending.append((entry.path, depth + 1))
                continue
            path = Path(entry.path)
            info = _stat(path, stat.S_ISREG)  # a dangling link, a fifo: not code
            if info is None:
                continue
            files.append((path, info))
            total += info.st_size
            if limit and len(files) > MAX_FILES:
                raise CodeTooLarge(f"{package}: more than {MAX_FILES} files")
            if limit and total > MAX_BYTES:
                raise CodeTooLarge(f"{package}: more than {MAX_BYTES} bytes of files")
    return files


def _entries(where: str, room: int | None) -> list[os.DirEntry[str]]:
    """The entries of directory ``where``: at most ``room`` + 1 of them (None: all)."""
    found: list[os.DirEntry[str]] = []
    with os.scandir(where) as scan:
        for entry in scan:
            found.append(entry)
            if room is not None and len(found) > room:
                break  # past the bound already: the rest is never read
    return found


def _stamp(directory: Path, path: Path, info: os.stat_result) -> Stamp:
    return (str(path.relative_to(directory)), info.st_size, info.st_mtime_ns,
            info.st_ctime_ns, info.st_ino)  # fmt: skip


def fingerprint(source: ModuleSource) -> tuple[Stamp, ...]:
    """Stat the module's manifest and code files: cheap, no file is read."""
    directory = source.directory
    stamps = [_stamp(directory, path, info)
              for path, info in code_files(directory, entry_top(source))]  # fmt: skip
    manifest = _stat(source.path, stat.S_ISREG)
    if manifest is not None:  # removed: the identity is that of what is left
        stamps.append(_stamp(directory, source.path, manifest))
    return tuple(stamps)


def _digest(parts: list[tuple[str, str]]) -> str:
    body = "".join(f"{name}\0{digest}\n" for name, digest in parts)
    return "sha256:" + hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class CodeWatch:
    """One module's code identity, hashed anew only when its files' fingerprint moved."""

    __slots__ = ("_last", "source")

    def __init__(self, source: ModuleSource) -> None:
        self.source = source
        self._last: Identity | None = None

    def identify(self) -> Identity:
        """The identity of the code on disk now; CodeTooLarge past a bound.

        Files that change while they are hashed are hashed again (twice at
        most): the identity returned matches the fingerprint it carries.
        """
        stamps = fingerprint(self.source)
        last = self._last
        if last is not None and last.fingerprint == stamps:
            return last
        for _ in range(3):
            identity = self._hash(stamps)
            again = fingerprint(self.source)
            if again == stamps:
                break
            stamps = again
        self._last = identity
        return identity

    def unchanged_since(self, identity: Identity) -> bool:
        """Whether the files still have the fingerprint ``identity`` was taken with."""
        try:
            return fingerprint(self.source) == identity.fingerprint
        except CodeTooLarge:
            return False

    def _hash(self, stamps: tuple[Stamp, ...]) -> Identity:
        directory = self.source.directory
        parts = [(stamp[0], _file_digest(directory / stamp[0], stamp)) for stamp in stamps]
        manifest = str(self.source.path.relative_to(directory))
        package = [part for part in parts if part[0] != manifest]
        return Identity(_digest(parts), _digest(package), stamps)


def _file_digest(path: Path, stamp: Stamp) -> str:
    """SHA-256 (hex) of a file's contents, read only if its stamp is new."""
    key = (str(path), *stamp[1:])
    known = _DIGESTS.get(key)
    if known is not None:
        return known
    try:
        data = _read_bounded(path, stamp[1])
    except OSError:
        data = b""  # removed meanwhile: the fingerprint check after the hash sees it
    digest = hashlib.sha256(data).hexdigest()
    if len(_DIGESTS) >= _DIGESTS_MAX:
        _DIGESTS.clear()
    _DIGESTS[key] = digest
    return digest


def _read_bounded(path: Path, size: int) -> bytes:
    """At most ``size`` + 1 bytes of a regular file, never blocking.

    A file swapped for a FIFO or a device after its stat, or grown, is read
    no further (the fingerprint taken after the hash then differs): a module
    cannot make the daemon block or read without end.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        chunks: list[bytes] = []
        left = size + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def signed_identity(source: ModuleSource, signed: tuple[tuple[str, str], ...]) -> Identity:
    """The identity of a signed module's code: the files its signature lists.

    Its workers import only those bytes (ipad/worker/verified_import.py),
    whatever the disk holds meanwhile. Equal to ``CodeWatch.identify``'s
    while the disk matches the signature.
    """
    manifest = str(source.path.relative_to(source.directory))
    parts = sorted(signed)
    package = [part for part in parts if part[0] != manifest]
    package_first = [*package, *(part for part in parts if part[0] == manifest)]
    return Identity(_digest(package_first), _digest(package), ())


def package_identity(directory: Path, top: str) -> str | None:
    """The package id of ``top`` in ``directory`` (a fork server's preload); None past a bound."""
    try:
        files = code_files(directory, top)
    except CodeTooLarge:
        return None
    parts = []
    for path, info in files:
        stamp = _stamp(directory, path, info)
        parts.append((stamp[0], _file_digest(path, stamp)))
    return _digest(parts)
