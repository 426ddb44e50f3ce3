"""The API an IPA module implements, as the Python worker host runs it.

A module is a class with libcamera's lifecycle — ``init``, ``configure``,
``start``, ``stop`` and per-frame ``process_stats`` — whose arguments and
results are attrs classes (or plain msgpack values). Every public method is
callable through a proxy. Methods marked ``@setup`` (init, configure and start
by default) are the ones a client replays, in order, after its worker was
restarted, to bring a new instance to the state the old one had.

Large data travels as file descriptors: a parameter annotated ``Buffer``
receives a memfd the client passed with the call, mapped read-only (or
writable, for a buffer the client passed as an output). Only a memfd sealed
against shrinking is mapped: a client that truncated a mapped buffer would
kill the worker, and every other client it serves, with SIGBUS. A buffer the
client registered once (MAP_BUFFERS, as libcamera's ``mapBuffers``) comes as
the same Buffer at every call, mapped once (ipad/worker/buffers.py); code that
reads or fills a buffer through ``cpu_access`` works with both, and with
dma-bufs, whose CPU access it brackets with ``DMA_BUF_IOCTL_SYNC``.

This module is imported inside workers: it uses only the standard library, so
a worker starts in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute ``@setup`` sets on a method.
SETUP_ATTRIBUTE = "__ipad_setup__"


def setup(method: F) -> F:
    """Mark a method as setup: replayed after a worker restart, in call order."""
    setattr(method, SETUP_ATTRIBUTE, True)
    return method


#: The attribute ``@undoes`` sets on a method.
UNDOES_ATTRIBUTE = "__ipad_undoes__"


def undoes(setup_method: str) -> Callable[[F], F]:
    """Mark a method as undoing a setup method: calling it drops that call from the replay.

    ``stop`` undoes ``start``: a client that stopped its camera must not find
    it started again after a worker restart.
    """

    def mark(method: F) -> F:
        setattr(method, UNDOES_ATTRIBUTE, setup_method)
        return method

    return mark


def undone_by(cls: type, name: str) -> str | None:
    """The setup method that method ``name`` of ``cls`` undoes, if any (looked up the MRO)."""
    for base in cls.__mro__:
        target = getattr(vars(base).get(name), UNDOES_ATTRIBUTE, None)
        if target is not None:
            return str(target)
    return None


def is_setup(cls: type, name: str) -> bool:
    """Whether method ``name`` of ``cls`` is setup: marked ``@setup`` here or in a base class.

    Looking through the MRO means overriding ``configure`` without repeating
    the decorator keeps it a setup method.
    """
    return any(getattr(vars(base).get(name), SETUP_ATTRIBUTE, False) for base in cls.__mro__)


#: fcntl(2) seal (linux/fcntl.h): the file cannot shrink, so a mapping of it cannot fault.
F_SEAL_SHRINK = 0x0002
#: fcntl(2) seals against writes (linux/fcntl.h): what makes a buffer an input.
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010


class BufferRefused(ValueError):
    """A passed buffer is not safe to map; the call fails with ``bad_arguments``."""


class Buffer:
    """A file descriptor passed with a call, mapped on demand and closed after the call.

    A buffer the client registered (MAP_BUFFERS) is a subclass instead, mapped
    once and kept until unmapped (ipad/worker/buffers.py); ``cpu_access``
    works with both.
    """

    def __init__(self, fd: int, name: str = "buffer") -> None:
        self.fd = fd
        #: The parameter it was passed as, for error messages.
        self.name = name
        self._map: mmap.mmap | None = None
        self._writable = False
        #: Why mapping it was refused, if it was: the call's error, whatever the module did.
        self.refused: BufferRefused | None = None

    @property
    def size(self) -> int:
        """The size of the file behind the descriptor."""
        return os.fstat(self.fd).st_size

    def map(self, *, writable: bool = False) -> memoryview:
        """Map the whole buffer, zero-copy, valid until the call returns.

        Read-only unless ``writable``, which only an output buffer allows (the
        client sealed an input against writes). BufferRefused unless the
        descriptor is a memfd sealed against shrinking: a file that can shrink
        under a mapping makes the next read of it a SIGBUS.
        """
        if self._map is None:
            seals = self._check()
            if os.fstat(self.fd).st_size == 0:
                # mmap refuses a length of 0; an empty file is an empty buffer (docs/protocol.md).
                if writable and seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                    self._refuse("it is sealed against writes (the client passed it as an input)")
                return memoryview(bytearray() if writable else b"")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                self._map = mmap.mmap(self.fd, 0, prot=prot, flags=mmap.MAP_SHARED)
            except PermissionError:
                if not writable:
                    raise
                self._refuse("it is sealed against writes (the client passed it as an input)")
            self._writable = writable
        elif writable and not self._writable:
            self._refuse("it was mapped read-only first")
        return memoryview(self._map)

    @contextlib.contextmanager
    def cpu_access(self, *, write: bool = False) -> Iterator[memoryview]:
        """The buffer's bytes for the CPU, writable if ``write`` (outputs only).

        For a memfd this is ``map``; a registered dma-buf also brackets the
        access with ``DMA_BUF_IOCTL_SYNC`` start and end, as the kernel asks.
        """
        yield self.map(writable=write)

    def _check(self) -> int:
        """The memfd's seals, once they are known to keep a mapping of it from faulting."""
        try:
            seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._refuse("it is not a memfd")
        if not seals & F_SEAL_SHRINK:
            self._refuse("the memfd is not sealed against shrinking (F_SEAL_SHRINK)")
        return seals

    def _refuse(self, why: str) -> NoReturn:
        self.refused = BufferRefused(f"buffer {self.name!r} cannot be mapped: {why}")
        raise self.refused

    def close(self) -> None:
        """Unmap and close; the worker host calls this when the call is over."""
        if self._map is not None:
            # A view the module kept alive holds the mapping until it goes.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Where a ModuleLog's records go: (level, event, fields, traceback).
LogSink = Callable[[str, str, dict[str, object], str], None]


def _python_logging_sink(level: str, event: str, fields: dict[str, object], tb: str) -> None:
    """Outside a worker (a module built in-process): records go to Python's ``logging``.

    Logger ``ipad.module``, at the record's level, so pytest's ``caplog`` sees them.
    """
    import logging  # noqa: PLC0415 - only outside a worker: logging imports threading

    text = " ".join([event, *(f"{k}={v}" for k, v in fields.items())])
    logging.getLogger("ipad.module").log(logging.getLevelName(level.upper()), "%s%s", text,
                                         f"\n{tb}" if tb else "")  # fmt: skip


class ModuleLog:
    """A module's log: records with a level, an event name and fields, for the daemon's log.

    In a worker each record reaches the daemon's log (and journald) at its
    level, with the module's name, the worker's pid and the instance's proxy
    (docs/modules.md, "Logging"); outside one, Python's ``logging``. Records
    are bounded (text, fields, rate): a module cannot flood the daemon's log.
    """

    __slots__ = ("_sink",)

    def __init__(self, sink: LogSink | None = None) -> None:
        self._sink = sink or _python_logging_sink

    def debug(self, event: str, /, **fields: object) -> None:
        """A record at level debug (dropped unless the daemon logs at debug)."""
        self._sink("debug", event, fields, "")

    def info(self, event: str, /, **fields: object) -> None:
        """A record at level info."""
        self._sink("info", event, fields, "")

    def warning(self, event: str, /, **fields: object) -> None:
        """A record at level warning."""
        self._sink("warning", event, fields, "")

    def error(self, event: str, /, **fields: object) -> None:
        """A record at level error."""
        self._sink("error", event, fields, "")

    def critical(self, event: str, /, **fields: object) -> None:
        """A record at level critical."""
        self._sink("critical", event, fields, "")

    def exception(self, event: str, /, **fields: object) -> None:
        """A record at level error with the traceback of the exception being handled."""
        import sys  # noqa: PLC0415 - cheap; keeps this module's imports minimal
        import traceback  # noqa: PLC0415

        exc = sys.exc_info()[1]
        tb = "".join(traceback.format_exception(exc)).rstrip() if exc is not None else ""
        self._sink("error", event, fields, tb)


class ModuleContext:
    """What the host gives an instance: its tuning data, a way to send events, a log."""

    def __init__(
        self,
        tuning: Mapping[str, Any],
        emit: Callable[[str, object], None],
        instance_id: int,
        log: ModuleLog | None = None,
    ) -> None:
        self.tuning = tuning
        self.instance_id = instance_id
        self._emit = emit
        #: Records with levels for the daemon's log: ``self.context.log.warning("event", k=v)``.
        self.log = log if log is not None else ModuleLog()

    def emit(self, name: str, data: object = None) -> None:
        """Send an event (for example new sensor controls) to this instance's client."""
        self._emit(name, data)


class IPAModule:
    """Base class of IPA modules; one instance per proxy, so clients never share state.

    The constructor must be cheap and free of side effects beyond the instance:
    the host builds one probe instance when it loads the module, so a tuning
    file the constructor rejects fails the worker's start with that message.
    """

    def __init__(self, context: ModuleContext) -> None:
        self.context = context

    @setup
    def init(self, settings: Mapping[str, Any] | None = None) -> None:
        """Prepare the algorithm; ``settings`` come from the pipeline handler."""

    @setup
    def configure(self, sensor_info: Mapping[str, Any] | None = None) -> None:
        """Adapt to the sensor mode the camera was configured for."""

    @setup
    def start(self) -> None:
        """Streaming starts."""

    @undoes("start")
    def stop(self) -> None:
        """Streaming stops."""

    def close(self) -> None:
        """The proxy was released or its client went away; free what the instance holds."""


#: Methods of the base class that are not callable through a proxy.
NOT_CALLABLE = frozenset({"close", "context"})


def callable_methods(cls: type[IPAModule]) -> dict[str, Callable[..., Any]]:
    """The methods a proxy may call: every public method but ``close``."""
    methods: dict[str, Callable[..., Any]] = {}
    for name in dir(cls):
        if name.startswith("_") or name in NOT_CALLABLE:
            continue
        value = getattr(cls, name)
        if callable(value) and not isinstance(value, type):
            methods[name] = value
    return methods
