"""An IPA module served in-process by the worker host's own code, called as a client calls it.

``ModuleHarness`` is for a module author's unit tests (docs/modules.md,
"Testing a module"). Nothing here re-implements the worker: a real
``WorkerHost`` (ipad/worker/host.py) runs its ``serve`` loop in a thread of the
test process, over socket pairs, and the harness plays the daemon on the
control socket (LOAD, OPEN_INSTANCE, CLOSE_INSTANCE, SHUTDOWN) and the client
on each instance's channel. So:

- the tuning file is found as the daemon finds it (``ipad.config.tuning``:
  ``tuning_dirs``, then the installed tuning files; ``tuning`` a bare file
  name, ``uncalibrated.toml`` by default and as the fallback) and read by
  the worker host, which builds its probe instance: a tuning file the module
  rejects fails ``ModuleHarness`` with the error the daemon would report;
- arguments are checked against the module's description and sealed as the
  clients do (ipad/client), then converted by ``Method.bind``: a dict becomes
  the annotated attrs class, and a bad value raises the same ``IpadError``
  (``BadArguments``, with ``code`` and ``details``) a client gets;
- results come back msgpack-encoded and decoded, typed as the clients type
  them (objects as ``ipad.client.Record``), and events as ``(name, data)``.

What it is not: a sandbox, or a separate process. A module that crashes the
process, or calls ``os._exit``, ends the test run; a call that never returns
raises TimedOut after ``timeout``, but its thread cannot be stopped. Test those
under a real daemon (docs/modules.md, "Testing under a real daemon").
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ipad.client._buffers import FdArg, Output, Registered, make_buffer
from ipad.client._core import build_call
from ipad.client._describe import Description
from ipad.client._registry import BufferRegistry
from ipad.config.manifest import Manifest, load_manifest
from ipad.config.tuning import TuningFileNotFound, find_tuning_file
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    Disconnected,
    IpadError,
    TimedOut,
    WorkerCrashed,
    error_from_reply,
)
from ipad.protocol.fdpass import recv_packet, send_packet, sized_socketpair
from ipad.worker.host import WorkerHost

#: Seconds a load, an instance's opening or a call may take before TimedOut, by default.
DEFAULT_TIMEOUT = 10.0
#: Events kept per instance; later ones are counted in ``events_dropped``, not stored.
MAX_EVENTS = 10_000

#: What a Buffer argument may be: a descriptor (or Output / Registered, as a client passes
#: it), bytes to put in a fresh sealed memfd, or an open file object (its descriptor).
BufferValue = int | Output | Registered | bytes | bytearray | memoryview | Any


class ModuleHarness:
    """One module, loaded by a real worker host in this process; a context manager.

    ``manifest`` is the module's ``<name>.toml``; its directory is the module
    directory, put on ``sys.path`` as the worker does. ``tuning`` is the tuning
    file's name (as ``[modules.<name>] tuning``), looked for as
    ``<dir>/<module>/<tuning>`` in each of ``tuning_dirs`` (as the daemon's
    ``[daemon] tuning_dirs``) and then in the installed tuning files.
    ``environ`` is the environment the search reads (``IPAD_<MODULE>_TUNING_FILE``,
    and ``IPAD_CONFIG_PATH``, searched before ``tuning_dirs`` as the daemon
    does); by default none, so a test finds the same file on every machine.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        *,
        tuning: str | None = None,
        tuning_dirs: Iterable[str | os.PathLike[str]] = (),
        environ: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        path = Path(manifest).resolve()
        #: The validated manifest (ManifestError, naming each problem, if it is not).
        self.manifest: Manifest = load_manifest(path)
        if not self.manifest.entry_point:
            raise ValueError(f"{path}: no entry_point; a native module cannot run in-process")
        self.module_dir = path.parent
        self.timeout = timeout
        #: The tuning file the worker host reads (TuningFileNotFound lists every path tried).
        try:
            self.tuning_file: Path = find_tuning_file(
                self.manifest.name,
                tuning,
                environ=dict(environ or {}),
                privileged=False,
                tuning_dirs=[Path(d).resolve() for d in tuning_dirs],
            )
        except TuningFileNotFound as exc:
            # The daemon's hint names its configuration; here the arguments decide.
            name = self.manifest.name
            hint = (f"put it in <dir>/{name}/ and pass tuning_dirs=[<dir>] (every module ships "
                    f"{name}/uncalibrated.toml, empty if it has no tuning keys)")  # fmt: skip
            raise TuningFileNotFound(name, exc.tried, hint) from None
        #: READY: the module's ``version`` (its ``__version__``, "0" without), methods, types.
        self.ready: p.Ready | None = None
        self.description = Description((), {})
        self._control: socket.socket | None = None
        self._host: WorkerHost | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._ids = itertools.count(1)
        #: Instance ids as the daemon numbers proxies' instances: from 1 (0 is the probe).
        self._instance_ids = itertools.count(1)
        self._instances: dict[int, ModuleInstance] = {}
        self._saved_path: list[str] = []
        self._saved_modules: set[str] = set()

    @property
    def name(self) -> str:
        """The module's name, from its manifest."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The version the worker reported in READY, as ``ipadctl status`` shows it."""
        if self.ready is None:
            raise RuntimeError("the module is not loaded: use the harness as a context manager")
        return self.ready.version

    def __enter__(self) -> ModuleHarness:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker host and LOAD the module; raise its error if it does not load."""
        if self._host is not None:
            raise RuntimeError("the harness is already started")
        self._saved_path = list(sys.path)
        self._saved_modules = set(sys.modules)
        importlib.invalidate_caches()  # files written since an import are seen, as by a worker
        ours, theirs = sized_socketpair()
        self._control = ours
        self._host = WorkerHost(theirs)
        self._thread = threading.Thread(
            target=self._serve, name=f"ipad-harness:{self.name}", daemon=True
        )
        self._thread.start()
        load = p.Load(
            module=self.name,
            entry_point=self.manifest.entry_point or "",
            module_dir=str(self.module_dir),
            tuning=str(self.tuning_file),
            minor=p.PROTOCOL_MINOR,
        )
        try:
            frame = self._control_request(load)
        except BaseException:
            self.close()
            raise
        if not isinstance(frame.message, p.Ready):
            error = _failure(frame, "LOAD")
            self.close()
            raise error
        self.ready = frame.message
        self.description = Description(self.ready.methods, self.ready.types)

    def _serve(self) -> None:
        host = self._host
        assert host is not None  # noqa: S101 - set before the thread starts
        try:
            host.serve()
        except BaseException as exc:  # noqa: BLE001 - what would end a worker process
            # SystemExit, KeyboardInterrupt or the like from module code ends a worker:
            # its sockets close with it, and the harness's callers see it as clients do.
            self._failure = exc
            for instance in list(host.instances.values()):
                instance.sock.close()
            host.control.close()

    def _crashed(self) -> IpadError:
        """The error a call gets once the worker host has died (WorkerCrashed, as clients get)."""
        failure = self._failure
        if failure is None:
            return Disconnected(f"{self.name}: the worker host closed the connection")
        return WorkerCrashed(
            f"{self.name} worker host died: {failure!r}",
            {"exception": type(failure).__name__, "traceback": _traceback(failure)},
        )

    def _control_request(self, message: p.Message, fds: tuple[int, ...] = ()) -> p.Frame:
        """Send a control request; its reply, InstanceClosed notices skipped (within timeout)."""
        assert self._control is not None  # noqa: S101 - only while started
        request_id = next(self._ids)
        try:
            send_packet(self._control, p.encode(message, request_id, len(fds)), fds)
        except OSError:
            raise self._crashed() from None
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._receive(self._control, p.FROM_WORKER_CONTROL, deadline, message)
            if frame is None:
                raise self._crashed()
            if isinstance(frame.message, p.InstanceClosed):
                self._closed_by_worker(frame.message)
            elif frame.request_id == request_id:
                return frame

    def _receive(
        self, sock: socket.socket, allowed: frozenset[p.MsgType], deadline: float, what: object
    ) -> p.Frame | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimedOut(f"{self.name}: no reply to {what!r} within {self.timeout:g} s",
                           {"sent": True})  # fmt: skip
        sock.settimeout(remaining)
        try:
            received = recv_packet(sock)
        except TimeoutError:
            raise TimedOut(f"{self.name}: no reply to {what!r} within {self.timeout:g} s",
                           {"sent": True}) from None  # fmt: skip
        except OSError:
            return None
        return None if received is None else p.decode(*received, allowed=allowed)

    def _closed_by_worker(self, closed: p.InstanceClosed) -> None:
        instance = self._instances.get(closed.instance_id)  # closed (its socket too) with us
        if instance is not None:
            instance.closed_reason = closed.reason

    def open(self, **init: Any) -> ModuleInstance:
        """A new instance, made as OPEN_INSTANCE makes it; with arguments, ``init`` is called too.

        ``h.open(settings={...})`` is ``h.open()`` then ``call("init", settings={...})``.
        A constructor that raises fails this with the ModuleError a proxy request gets.
        """
        if self.ready is None:
            raise RuntimeError("the module is not loaded: use the harness as a context manager")
        ours, theirs = sized_socketpair()
        instance_id = next(self._instance_ids)
        try:
            frame = self._control_request(p.OpenInstance(instance_id), (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker host has its own copy
        if not isinstance(frame.message, p.InstanceOpened):
            ours.close()
            raise _failure(frame, "OPEN_INSTANCE")
        instance = self._instances[instance_id] = ModuleInstance(self, instance_id, ours)
        if init:
            try:
                instance.call("init", **init)
            except BaseException:
                instance.close()
                raise
        return instance

    def close(self) -> None:
        """Close every instance, SHUTDOWN the host; sys.path as it was, the module unimported."""
        for instance in list(self._instances.values()):
            instance.close()
        if self._control is not None:
            with contextlib.suppress(OSError):
                send_packet(self._control, p.encode(p.Shutdown()))
        if self._thread is not None:
            self._thread.join(self.timeout)
            stuck = self._thread.is_alive()
            self._thread = None
        else:
            stuck = False
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._host is not None and not stuck:
            self._host.control.close()  # closing twice is harmless
            self._host.epoll.close()
        self._host = None
        # The module's code goes with the harness, as it goes with its worker: the next
        # harness imports it afresh (a test that edits it sees the edit). Only what was
        # imported from its directory: a dependency such as numpy cannot be imported twice.
        sys.path[:] = self._saved_path
        own = str(self.module_dir) + os.sep
        for name in set(sys.modules) - self._saved_modules:
            origin = getattr(sys.modules.get(name), "__file__", None) or ""
            if origin.startswith(own):
                sys.modules.pop(name, None)
        if stuck:
            raise TimedOut(f"{self.name}: the worker host did not stop within {self.timeout:g} s "
                           "(a call that never returns?)")  # fmt: skip


class ModuleInstance:
    """One module instance, called through its channel as a client's proxy calls it."""

    def __init__(self, harness: ModuleHarness, instance_id: int, channel: socket.socket) -> None:
        self.harness = harness
        self.instance_id = instance_id
        self.channel: socket.socket | None = channel
        self._events: list[tuple[str, Any]] = []
        #: Events past MAX_EVENTS, counted and dropped.
        self.events_dropped = 0
        #: Why the worker host closed the instance on its own, if it did.
        self.closed_reason: str | None = None
        self._ids = itertools.count(1)
        #: The buffers registered with ``map_buffers``, kept as the client keeps them.
        self._registry = BufferRegistry()

    @property
    def events(self) -> list[tuple[str, Any]]:
        """Every ``(name, data)`` event the instance sent so far, in order (up to MAX_EVENTS)."""
        self._drain()
        return self._events

    def call(self, method: str, /, **args: Any) -> Any:
        """Call ``method`` as a client does; its result, or the client's IpadError.

        A Buffer parameter takes a descriptor (sealed first, as clients seal it;
        ``Output(fd)`` for one the module writes, ``Registered(id)`` for one
        registered with ``map_buffers``), bytes (put into a fresh sealed memfd),
        or an open file object.
        """
        harness = self.harness
        buffers = _buffer_params(harness, method)
        plain = {k: v for k, v in args.items() if k not in buffers}
        made: list[int] = []
        try:
            fds = {k: _fd_arg(v, made) for k, v in args.items() if k in buffers}
            harness.description.check(harness.name, method, plain, fds)
            message, fd_list = build_call(method, plain, fds)
            request_id = self._send(message, fd_list)
        finally:
            p.close_fds(made)
        reply = self._reply(request_id, method, p.Result)
        assert isinstance(reply, p.Result)  # noqa: S101 - _reply checked it
        return harness.description.typed(method, reply.value)

    def map_buffers(self, buffers: Mapping[int, BufferValue]) -> None:
        """Register buffers by id (MAP_BUFFERS), as a client's ``map_buffers`` does.

        Each value is what a Buffer argument takes (or ``ipad.client.DmaBuf``);
        calls then name one with ``Registered(id)``.
        """
        made: list[int] = []
        try:
            given = {i: _fd_arg(v, made) for i, v in buffers.items()}
            message, fd_list = self._registry.map_message(given)  # type: ignore[arg-type]
            request_id = self._send(message, fd_list)
            self._reply(request_id, "map_buffers", p.BuffersMapped)
            self._registry.mapped(given)  # type: ignore[arg-type]
        finally:
            p.close_fds(made)

    def unmap_buffers(self, ids: Iterable[int]) -> None:
        """Unregister buffers (UNMAP_BUFFERS): the worker unmaps them and closes its copies."""
        wanted = list(ids)
        request_id = self._send(self._registry.unmap_message(wanted, ()), [])
        self._reply(request_id, "unmap_buffers", p.BuffersUnmapped)
        self._registry.unmapped(wanted)

    def _send(self, message: p.Message, fd_list: list[int]) -> int:
        """Send a channel request with its descriptors (which stay ours); its request id."""
        channel = self._channel()
        request_id = next(self._ids)
        try:
            send_packet(channel, p.encode(message, request_id, len(fd_list)), fd_list)
        except OSError:
            if self.harness._failure is not None:
                raise self.harness._crashed() from None
            raise Disconnected(f"{self.harness.name}: the instance's channel closed"
                               f" ({self._why_closed()})") from None  # fmt: skip
        return request_id

    def _reply(self, request_id: int, what: str, expected: type[p.Message]) -> p.Message:
        """The reply to ``request_id``, events before it kept; its error raised as a client's."""
        harness = self.harness
        channel = self._channel()
        deadline = time.monotonic() + harness.timeout
        while True:
            frame = harness._receive(channel, p.FROM_WORKER_CHANNEL, deadline, what)
            if frame is None:
                if harness._failure is not None:
                    raise harness._crashed()
                raise Disconnected(f"{harness.name}: the instance's channel closed"
                                   f" ({self._why_closed()})")  # fmt: skip
            frame.close_fds()
            reply = frame.message
            if isinstance(reply, p.ModuleEvent):
                self._keep(reply)
            elif frame.request_id == request_id:
                if isinstance(reply, p.Error):
                    raise error_from_reply(reply)
                if not isinstance(reply, expected):
                    raise IpadError(f"expected {expected.TYPE.name}, got {reply.TYPE.name}")
                return reply

    def _channel(self) -> socket.socket:
        if self.channel is None:
            raise Disconnected(f"{self.harness.name}: instance closed ({self._why_closed()})")
        return self.channel

    def _why_closed(self) -> str:
        with contextlib.suppress(IpadError, OSError):
            # A notice the worker host sent on its own says why.
            self.harness._control_request(p.Ping())
        return self.closed_reason or "closed"

    def _keep(self, event: p.ModuleEvent) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append((event.name, event.data))
        else:
            self.events_dropped += 1

    def _drain(self) -> None:
        """Take the events that came since the last call, without waiting."""
        channel = self.channel
        if channel is None:
            return
        channel.setblocking(False)
        try:
            while True:
                try:
                    received = recv_packet(channel)
                except (BlockingIOError, OSError):
                    return
                if received is None:
                    return
                frame = p.decode(*received, allowed=p.FROM_WORKER_CHANNEL)
                frame.close_fds()
                if isinstance(frame.message, p.ModuleEvent):
                    self._keep(frame.message)
        finally:
            channel.setblocking(True)

    def close(self) -> None:
        """Release the instance: the worker host calls the module's ``close``."""
        harness = self.harness
        if harness._instances.pop(self.instance_id, None) is not None:
            with contextlib.suppress(IpadError, OSError):
                # CLOSE_INSTANCE has no reply; a PING after it is answered once it is done.
                assert harness._control is not None  # noqa: S101 - instances live while started
                send_packet(harness._control, p.encode(p.CloseInstance(self.instance_id)))
                harness._control_request(p.Ping())
        if self.channel is not None:
            self._drain()
            self.channel.close()
            self.channel = None
        self._registry.close()

    def __enter__(self) -> ModuleInstance:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _buffer_params(harness: ModuleHarness, method: str) -> frozenset[str]:
    """The method's Buffer parameters, from the worker host's own method table."""
    host = harness._host
    loaded = host.loaded if host is not None else None
    found = loaded.methods.get(method) if loaded is not None else None
    return frozenset(found.buffers) if found is not None else frozenset()


def _fd_arg(value: BufferValue, made: list[int]) -> FdArg:
    """What the client's ``fds`` takes for a Buffer argument; memfds made here go in ``made``."""
    if isinstance(value, bytes | bytearray | memoryview):
        fd = make_buffer(bytes(value))
        made.append(fd)
        return fd
    if isinstance(value, int | Output | Registered):
        return value
    fileno = getattr(value, "fileno", None)
    if callable(fileno):
        return int(fileno())
    return value  # type: ignore[no-any-return] # refused by the client's check, naming it


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-5)).rstrip()


def _failure(frame: p.Frame, what: str) -> IpadError:
    message = frame.message
    frame.close_fds()
    if isinstance(message, p.Error):
        return error_from_reply(message)
    return IpadError(f"{what}: unexpected {message.TYPE.name}")
