"""Buffers a client passes with a call, sealed so the worker cannot turn them against it.

A passed memfd is shared: without seals, the worker could shrink it (the
client's own mapping then dies of SIGBUS at its next touch), grow it, or
rewrite the client's data, replay copies included; passing the descriptor
read-only does not help, since the worker can reopen ``/proc/self/fd/N``
read-write. So before anything is sent, every descriptor is sealed (or found
sealed) against shrinking and growing, and an input buffer against writes:
``F_SEAL_FUTURE_WRITE`` refuses ``write(2)``, new writable shared mappings and
hole punching to everyone, while mappings the client made before keep working.
An ``Output`` buffer, which the module fills, is sealed against resizing only.

Seals are a property of the memfd, not of one descriptor, and cannot be
removed: passing a buffer once protects it for good. A descriptor that cannot
be protected is refused (BadArguments naming its parameter), never passed.
Imported by both clients: standard library only, no trio.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Mapping

import attrs

from ipad.protocol.errors import BadArguments

#: fcntl(2) seals (linux/fcntl.h); Python's fcntl module lacks F_SEAL_FUTURE_WRITE (Linux 5.1).
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010

#: What every passed buffer must carry: the worker can never change its size.
RESIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW
#: What an input buffer must carry besides: no writes through anything made from now on.
WRITE_SEALS = F_SEAL_WRITE | F_SEAL_FUTURE_WRITE
#: The seals the client adds to an input buffer that has none of WRITE_SEALS yet.
INPUT_SEALS = RESIZE_SEALS | F_SEAL_FUTURE_WRITE


@attrs.frozen
class Output:
    """A buffer the module writes into: ``fds={"params": Output(fd)}``.

    Sealed against shrinking and growing only, so the worker may map it
    writable; it can change the bytes, never the size. A module maps it with
    ``Buffer.map(writable=True)``.
    """

    fd: int


@attrs.frozen
class DmaBuf:
    """A dma-buf to register (``proxy.map_buffers({3: DmaBuf(fd)})``), passed as it is.

    A dma-buf cannot be resized by its importer, so it needs no seal (and
    takes none). The module may write it only if ``writable``; give a module
    read-only access with a descriptor opened read-only, since its exporter,
    not a seal, decides what a mapping of it may do. Registration only: a
    call's ``fds`` refuses it.
    """

    fd: int
    writable: bool = False


@attrs.frozen
class Registered:
    """A registered buffer named in a call: ``fds={"frame": Registered(3)}``."""

    id: int


#: What a call's ``fds`` maps each Buffer parameter to.
FdArg = int | Output | Registered
#: What ``map_buffers`` takes for each id: an input memfd, an Output, or a DmaBuf.
BufferArg = int | Output | DmaBuf


def make_buffer(data: bytes | int = 0, name: str = "ipad-buffer") -> int:
    """A memfd a client can pass: ``data`` written in (or that many zero bytes), sealable.

    The caller owns (and closes) the descriptor; it may map it writable first,
    and keeps writing through that mapping after passing it as an input.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if isinstance(data, int):
            os.ftruncate(fd, data)
        else:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_of(value: FdArg | DmaBuf) -> int:
    """The descriptor behind a ``fds`` value (-1 for a Registered one: it passes none)."""
    if isinstance(value, Registered):
        return -1
    return value.fd if isinstance(value, Output | DmaBuf) else value


def kind_of(value: BufferArg) -> str:
    """The wire's kind of a buffer to register (wire.BufferSpec)."""
    if isinstance(value, DmaBuf):
        return "dmabuf_output" if value.writable else "dmabuf"
    return "output" if isinstance(value, Output) else "input"


def protect(key: str, value: FdArg) -> int:
    """Seal the buffer passed as parameter ``key`` as it must be; its descriptor.

    BadArguments, naming ``key``, for a descriptor that is not a memfd, a
    memfd made without MFD_ALLOW_SEALING, one opened read-only that lacks its
    seals (adding seals needs write access), or an output sealed against writes.
    """
    if isinstance(value, Registered | DmaBuf):
        raise BadArguments(
            f"buffer {key!r}: {value!r} is not a descriptor to pass with a call "
            "(register a DmaBuf with map_buffers, then name it with Registered)",
            {"fd_arg": key, "sent": False},
        )
    output = isinstance(value, Output)
    fd = fd_of(value)
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise BadArguments(f"buffer {key!r}: {fd!r} is not a file descriptor", {"fd_arg": key})
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        why = "it is not a memfd" if exc.errno == errno.EINVAL else os.strerror(exc.errno or 0)
        raise _refused(key, fd, why) from None
    if output and seals & WRITE_SEALS:
        raise _refused(key, fd, "it is sealed against writes, so it cannot be an Output")
    needed = RESIZE_SEALS if output else INPUT_SEALS
    missing = needed & ~seals
    if not output and seals & WRITE_SEALS:
        missing &= ~F_SEAL_FUTURE_WRITE  # F_SEAL_WRITE already refuses every write
    if not missing:
        return fd
    if seals & F_SEAL_SEAL:
        raise _refused(key, fd, "it cannot take seals (a memfd made without "
                                "MFD_ALLOW_SEALING, or sealed with F_SEAL_SEAL)")  # fmt: skip
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, missing)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not missing & F_SEAL_FUTURE_WRITE:
                raise
            # A kernel before 5.1 has no F_SEAL_FUTURE_WRITE: F_SEAL_WRITE, which it refuses
            # (EBUSY) while the client holds a writable mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, missing & ~F_SEAL_FUTURE_WRITE | F_SEAL_WRITE)
    except OSError as exc:
        why = os.strerror(exc.errno or 0)
        if exc.errno == errno.EPERM:
            why = "it is open read-only, and sealing needs write access"
        elif exc.errno == errno.EBUSY:
            why = "this kernel cannot seal it against writes while it is mapped writable"
        raise _refused(key, fd, why) from None
    return fd


def protect_all(fds: Mapping[str, FdArg] | None) -> list[int]:
    """Protect every buffer of a call passed with it (not Registered ones); the descriptors."""
    return [protect(k, v) for k, v in (fds or {}).items() if not isinstance(v, Registered)]


def _refused(key: str, fd: int, why: str) -> BadArguments:
    return BadArguments(
        f"buffer {key!r} (fd {fd}) cannot be passed safely: {why}; "
        "pass a memfd from ipad.client.make_buffer()",
        {"fd_arg": key, "sent": False},
    )
