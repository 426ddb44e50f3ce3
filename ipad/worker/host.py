"""The Python worker host: one IPA module in one process, served by a blocking loop.

It imports neither trio nor structlog, so a worker is up in tens of
milliseconds. The daemon starts it with the control socket on fd 3 and sends
LOAD; the host imports the module, reads its tuning file and answers READY.
Each OPEN_INSTANCE brings a channel socket, served by its own module instance
until the client closes it. Calls on one worker run one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import inspect
import io
import os
import select
import signal
import socket
import sys
import time
import tomllib
import traceback
import typing
from collections.abc import Callable
from importlib import import_module
from typing import Any

import msgspec

from ipad.ipa import (
    Buffer,
    IPAModule,
    ModuleContext,
    ModuleLog,
    callable_methods,
    is_setup,
    undone_by,
)
from ipad.protocol import wire as p
from ipad.protocol.fdpass import CONTROL_FD, recv_packet, send_packet
from ipad.worker.buffers import InstanceBuffers, RegisteredBuffer
from ipad.worker.call_stats import CallStats
from ipad.worker.describe import Signature, describe
from ipad.worker.heartbeat_board import CLAIM_END, CLAIM_TEXT, Beater
from ipad.worker.modlog import LogSender

#: prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1
#: prctl(2) option: the thread's name (``comm``), at most 15 bytes, shown by ps and top.
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
#: /proc/self/uid_map of a process in the initial user namespace.
INITIAL_UID_MAP = "0 0 4294967295"

#: Module code before a board is given (LOAD's probe instance): timed by nobody.
UNTIMED: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

#: Traceback frames kept in an error reply: enough to find the bug, short enough to log.
TRACEBACK_LIMIT = 5

#: Exit status of a worker whose module could not be loaded (not a crash to retry quickly).
EXIT_LOAD_FAILED = 3

#: Exit status after a control message this worker cannot read. Not 0: a clean exit is not
#: restarted under the default ``restart = "on-failure"``, and this is a failure.
EXIT_PROTOCOL_ERROR = 2


def log(event: str, **fields: object) -> None:
    """One ``event key=value`` line on stderr; the daemon relays it with the module's name."""
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{event} {text}".rstrip(), file=sys.stderr, flush=True)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, loaded once, with the functions ipad calls looked up.

    A worker forked from the fork server finds all of it ready: loading and
    looking up cost a few hundred microseconds in each fresh fork otherwise.
    """
    lib = ctypes.CDLL(None, use_errno=True)
    for name in ("prctl", "syscall"):
        getattr(lib, name)
    return lib


def name_process(name: str) -> None:
    """Show ``name`` as the process's name in ps and top (``comm``, cut to 15 bytes).

    A forked worker's command line is the fork server's: its name says which
    module it serves.
    """
    libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(parent_pid: int | None) -> None:
    """Never outlive the daemon: ask for SIGKILL when the parent goes, then check it is there.

    The check closes the race where the parent died before prctl took effect.
    """
    if libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log("worker.pdeathsig_failed", errno=ctypes.get_errno())
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


class Method:
    """A callable module method with what is needed to convert its arguments."""

    def __init__(
        self, name: str, function: Callable[..., Any], setup: bool, undoes: str | None = None
    ) -> None:
        self.name = name
        self.setup = setup
        self.undoes = undoes
        self.signature = inspect.signature(function)
        # With Annotated kept: msgspec.Meta constraints are checked and described.
        hints = typing.get_type_hints(function, include_extras=True)
        self.types: dict[str, Any] = {}
        self.buffers: set[str] = set()
        for param in list(self.signature.parameters.values())[1:]:  # skip self
            hint = hints.get(param.name, Any)
            if hint is Buffer:
                self.buffers.add(param.name)
            else:
                self.types[param.name] = hint
        #: Parameters without a default: a call must give each (checked on every call).
        self.required = tuple(
            n
            for n, prm in self.signature.parameters.items()
            if n != "self" and prm.default is inspect.Parameter.empty
        )
        #: What its description is made of (ipad/worker/describe.py).
        self.described = Signature(function, hints, sorted(self.buffers))
        #: Its name as the heartbeat board's claim carries it while it runs.
        self.label = claim_label(name)

    def bind(
        self, call: p.Call, fds: tuple[int, ...], registered: InstanceBuffers | None = None
    ) -> dict[str, Any]:
        """Convert a call's arguments to the annotated types; ValueError names what is wrong.

        ``buffer_args`` name buffers ``registered`` with the instance (MAP_BUFFERS).
        """
        if len(call.fd_args) != len(fds):
            raise ValueError(f"{len(fds)} fds for {len(call.fd_args)} fd arguments")
        kwargs: dict[str, Any] = {}
        for name, value in call.args.items():
            if name not in self.types:
                raise ValueError(f"{self.name}() has no argument {name!r}")
            hint = self.types[name]
            try:
                kwargs[name] = value if hint is Any else msgspec.convert(value, hint)
            except msgspec.ValidationError as exc:  # say which argument: msgspec cannot
                raise ValueError(f"{self.name}() argument {name!r}: {exc}") from None
        for name, fd in zip(call.fd_args, fds, strict=True):
            if name not in self.buffers:
                raise ValueError(f"{self.name}() argument {name!r} is not a Buffer")
            kwargs[name] = Buffer(fd, name)
        for name, buffer_id in (call.buffer_args or {}).items():
            if name not in self.buffers or name in kwargs:
                what = "passed twice" if name in kwargs else "not a Buffer"
                raise ValueError(f"{self.name}() argument {name!r} is {what}")
            buffer = registered.get(buffer_id) if registered is not None else None
            if buffer is None:
                raise ValueError(f"{self.name}() argument {name!r}: buffer id {buffer_id!r} "
                                 "is not registered")  # fmt: skip
            buffer.name, buffer.refused = name, None
            kwargs[name] = buffer
        missing = [n for n in self.required if n not in kwargs]
        if missing:
            raise ValueError(f"{self.name}() is missing {', '.join(map(repr, missing))}")
        return kwargs


def claim_label(name: str) -> bytes:
    """``name`` encoded and cut to the room a board's claim has for it."""
    return name.encode("utf-8", "replace")[: CLAIM_END - CLAIM_TEXT]


#: The claims of module code that is not a call.
CONSTRUCTOR_LABEL = claim_label("__init__")
CLOSE_LABEL = claim_label("close")


class LoadedModule:
    """The module class a worker serves and its method table."""

    def __init__(self, load: p.Load, sender: LogSender | None = None) -> None:
        if load.signed is not None:
            # Before any of its code runs: only the bytes the daemon's check signed are run.
            from ipad.worker.verified_import import install  # noqa: PLC0415 - signed modules only

            install(load.module_dir, load.signed)
        if load.module_dir not in sys.path:
            sys.path.insert(0, load.module_dir)
        module_name, _, class_name = load.entry_point.partition(":")
        cls = getattr(import_module(module_name), class_name)
        if sender is not None:
            sender.bridge()  # its import brought logging: the probe instance's records go too
        if not (isinstance(cls, type) and issubclass(cls, IPAModule)):
            raise TypeError(f"{load.entry_point} is not an ipad.ipa.IPAModule subclass")
        self.cls: type[IPAModule] = cls
        self.name = load.module
        self.version = str(getattr(sys.modules[module_name], "__version__", "0"))
        with open(load.tuning, encoding="utf-8") as file:  # noqa: PTH123 - no pathlib: see sandbox._write
            try:
                self.tuning = tomllib.loads(file.read())
            except tomllib.TOMLDecodeError as exc:  # name the file: the reason would not
                raise ValueError(f"tuning file {load.tuning} is not valid TOML: {exc}") from None
        # One probe instance checks the tuning now: a bad tuning file fails the start,
        # with the module's own message, instead of every proxy request later.
        log = ModuleLog(sender.sink(0)) if sender is not None else None
        cls(ModuleContext(self.tuning, _discard_event, instance_id=0, log=log)).close()
        self.methods = method_table(cls)
        self.specs, self.types = method_specs(cls)


#: Method tables by module class (see ``method_table``).
_METHOD_TABLES: dict[type[IPAModule], dict[str, Method]] = {}
#: READY's methods and types by module class (see ``method_specs``).
_METHOD_SPECS: dict[type[IPAModule], tuple[tuple[p.MethodSpec, ...], dict[str, Any]]] = {}


def method_table(cls: type[IPAModule]) -> dict[str, Method]:
    """A module class's callable methods, read once per class.

    Reading signatures and type hints costs about a millisecond in a fresh
    fork; the fork server builds the tables of the modules it preloads, so
    forked workers start with them.
    """
    table = _METHOD_TABLES.get(cls)
    if table is None:
        table = _METHOD_TABLES[cls] = {
            name: Method(name, fn, is_setup(cls, name), undone_by(cls, name))
            for name, fn in callable_methods(cls).items()
        }
    return table


def method_specs(cls: type[IPAModule]) -> tuple[tuple[p.MethodSpec, ...], dict[str, Any]]:
    """READY's described methods and their named types, built once per class.

    Generating JSON Schemas costs milliseconds: like the method table, the fork
    server builds these for the modules it preloads. A class whose annotations
    cannot be described at all is served undescribed (names only), as before.
    """
    specs = _METHOD_SPECS.get(cls)
    if specs is None:
        table = method_table(cls)
        try:
            described, types = describe({n: m.described for n, m in table.items()})
        except Exception as exc:  # noqa: BLE001 - a description is optional, never fatal
            log("worker.description_failed", module_class=cls.__qualname__, error=repr(exc))
            described, types = {}, {}
        methods = tuple(
            p.MethodSpec(m.name, m.setup, m.undoes, **described.get(m.name, {}))
            for m in table.values()
        )
        specs = _METHOD_SPECS[cls] = (methods, types)
    return specs


class Instance:
    """One module instance and the channel its client calls it on."""

    def __init__(self, instance_id: int, sock: socket.socket, module: IPAModule | None) -> None:
        self.instance_id = instance_id
        self.sock = sock
        self.module = module
        #: The buffers its client registered (MAP_BUFFERS), mapped until unmapped.
        self.buffers = InstanceBuffers()


class WorkerHost:
    """The blocking event loop over the control socket and every instance's channel."""

    def __init__(self, control: socket.socket, refused: str | None = None) -> None:
        self.control = control
        #: Why this worker must not load its module (its sandbox could not be built).
        self.refused = refused
        # epoll directly: selectors' Python bookkeeping was a few microseconds of every call.
        self.epoll = select.epoll()
        self.epoll.register(control, select.EPOLLIN)
        #: What each registered descriptor is: None for the control socket, else an instance.
        self.handlers: dict[int, Instance | None] = {control.fileno(): None}
        self.loaded: LoadedModule | None = None
        self.instances: dict[int, Instance] = {}
        self.running = True
        self.exit_status = 0
        #: Bumps the heartbeat board LOAD passed (ipad/worker/heartbeat_board.py); None: PING.
        self.beater: Beater | None = None
        #: The module's log records and exceptions, to the daemon (ipad/worker/modlog.py).
        self.modlog = LogSender(control)
        #: Counts calls, latency and errors on the board's second page (ipad/worker/call_stats.py).
        self.stats: CallStats | None = None

    def serve(self) -> int:
        """Run until the daemon says SHUTDOWN or goes away; return the exit status."""
        while self.running:
            beater = self.beater
            if beater is not None:
                # Every turn of the loop is a beat, and the loop turns at least once a
                # heartbeat interval: a module call that never returns stops both.
                beater.beat()
                events = self.epoll.poll(beater.wait)
            else:  # no beats to keep: wake only for what comes, or to report dropped records
                events = self.epoll.poll(self.modlog.wait())
            for fd, _ in events:
                if fd not in self.handlers:
                    continue  # an instance closed earlier in this batch
                instance = self.handlers[fd]
                if instance is None:
                    self._on_control()
                else:
                    self._on_channel(instance)
            if self.modlog.pending:  # records dropped a while ago, and none has said so since
                self.modlog.tick()
        for instance_id in list(self.instances):
            self._close_instance(instance_id, notify=None)
        self.modlog.tick(final=True)  # what it dropped, before it goes
        return self.exit_status

    # --- control channel ---------------------------------------------------

    def _on_control(self) -> None:
        try:
            received = recv_packet(self.control)
            if received is None:
                self.running = False  # the daemon is gone
                return
            frame = p.decode(*received, allowed=p.TO_WORKER_CONTROL)
        except p.ProtocolError as exc:
            log("worker.control_protocol_error", reason=exc.reason)
            self.running = False
            self.exit_status = EXIT_PROTOCOL_ERROR
            return
        message = frame.message
        if isinstance(message, p.Load):
            self._load(message, frame)
        elif isinstance(message, p.OpenInstance):
            self._open_instance(message, frame)
        elif isinstance(message, p.Ping):
            self._send_control(p.Pong(), frame.request_id)
        elif isinstance(message, p.Heartbeat):
            if self.beater is not None:
                self.beater.pace(message.interval)
        elif isinstance(message, p.CloseInstance):
            self._close_instance(message.instance_id, notify=None)
        elif isinstance(message, p.Shutdown):
            self.running = False

    def _send_control(self, message: p.Message, request_id: int) -> None:
        send_packet(self.control, p.encode(message, request_id))

    def _load(self, load: p.Load, frame: p.Frame) -> None:
        request_id = frame.request_id
        board = frame.fds[0] if frame.fds else None
        try:
            if board is not None and load.heartbeat_interval > 0 and self.loaded is None:
                self.beater = Beater(board, load.heartbeat_interval)
                enable_crash_dumps(self.beater, board)
                self.stats = CallStats.attach(board)
        except (OSError, ValueError) as exc:  # not a board we can map: answer PINGs instead
            log("worker.heartbeat_board_unusable", module=load.module, error=repr(exc))
        finally:
            frame.close_fds()  # the mapping, if any, stays
        if self.loaded is not None:
            self._send_control(
                p.Error(p.ErrorCode.BAD_MESSAGE, "module already loaded"), request_id
            )
            return
        if self.refused is not None:
            self._send_control(p.Error(p.ErrorCode.MODULE_ERROR, self.refused), request_id)
            self.running = False
            self.exit_status = EXIT_LOAD_FAILED
            return
        self.modlog.configure(load)
        try:
            self.loaded = LoadedModule(load, self.modlog)
        except Exception as exc:  # noqa: BLE001 - any failure to load is reported, then we exit
            log("worker.load_failed", module=load.module, error=repr(exc))
            refused = getattr(exc, "refused_code", None)  # verified_import.CodeRefused
            text = (f"code refused: {refused}" if refused is not None
                    else f"cannot load {load.entry_point}: {exc!r}")  # fmt: skip
            details = {"traceback": _short_traceback(exc)}
            if refused is not None:
                details["refused"] = refused
            self._send_control(p.Error(p.ErrorCode.MODULE_ERROR, text, details), request_id)
            self.running = False
            self.exit_status = EXIT_LOAD_FAILED
            return
        name_process(f"ipad:{load.module}")
        ready = p.Ready(
            load.module, self.loaded.version, self.loaded.specs, os.getpid(),
            beats=self.beater is not None, types=self.loaded.types,
            minor=p.agreed_minor(load.minor),
        )  # fmt: skip
        try:
            packet = p.encode(ready, request_id)
        except ValueError:  # past the packet limit with its description: served undescribed
            log("worker.description_dropped", module=load.module, reason="READY too large")
            bare = tuple(p.MethodSpec(m.name, m.setup, m.undoes) for m in ready.methods)
            packet = p.encode(msgspec.structs.replace(ready, methods=bare, types={}), request_id)
        send_packet(self.control, packet)

    def module_code(self) -> contextlib.AbstractContextManager[None]:
        """Around module code (a constructor, a call, ``close``): the board says it runs.

        The daemon times what runs against ``call_timeout`` (ipad/worker/heartbeat_board.py):
        a thread that beats cannot hide a call that blocks the loop.
        """
        return self.beater if self.beater is not None else UNTIMED

    def _open_instance(self, message: p.OpenInstance, frame: p.Frame) -> None:
        if self.loaded is None or len(frame.fds) != 1 or message.instance_id in self.instances:
            frame.close_fds()
            error = p.Error(p.ErrorCode.BAD_MESSAGE, "cannot open that instance now")
            self._send_control(error, frame.request_id)
            return
        sock = socket.socket(fileno=frame.fds[0])
        instance = Instance(message.instance_id, sock, None)
        context = ModuleContext(
            self.loaded.tuning, lambda name, data: self._emit(instance, name, data),
            message.instance_id, ModuleLog(self.modlog.sink(message.instance_id)),
        )  # fmt: skip
        if self.beater is not None:
            self.beater.claim(CONSTRUCTOR_LABEL, message.instance_id)
        self.modlog.instance_id = message.instance_id  # its logging records name it
        try:
            with self.module_code():
                instance.module = self.loaded.cls(context)
        except Exception as exc:  # noqa: BLE001 - the module's constructor failed: tell the daemon
            sock.close()
            error = p.Error(
                p.ErrorCode.MODULE_ERROR,
                f"{self.loaded.name} instance failed: {exc!r}",
                {"traceback": _short_traceback(exc)},
            )
            self.modlog.exception(message.instance_id, "__init__", exc, _short_traceback(exc))
            self._send_control(error, frame.request_id)
            return
        finally:
            self.modlog.instance_id = 0
        self.instances[message.instance_id] = instance
        self.epoll.register(sock, select.EPOLLIN)
        self.handlers[sock.fileno()] = instance
        self._send_control(p.InstanceOpened(message.instance_id), frame.request_id)

    # --- instance channels ---------------------------------------------------

    def _on_channel(self, instance: Instance) -> None:
        try:
            received = recv_packet(instance.sock)
            if received is None:
                self._close_instance(instance.instance_id, notify="client closed the channel")
                return
            frame = p.decode(*received, allowed=p.TO_WORKER_CHANNEL)
        except p.ProtocolError as exc:
            self._reply(instance, p.Error(p.ErrorCode.BAD_MESSAGE, exc.reason), exc.request_id)
            self._close_instance(instance.instance_id, notify=f"protocol error: {exc.reason}")
            return
        except OSError as exc:
            self._close_instance(instance.instance_id, notify=f"channel failed: {exc.strerror}")
            return
        message = frame.message
        if isinstance(message, p.MapBuffers):
            reply: p.Message = instance.buffers.map(message, frame.fds)
        elif isinstance(message, p.UnmapBuffers):
            reply = instance.buffers.unmap(message)
        else:
            assert isinstance(message, p.Call)  # noqa: S101 - decode allowed nothing else
            started = time.monotonic_ns()
            reply = self._call(instance, message, frame.fds)
            if self.stats is not None:
                code = reply.code if isinstance(reply, p.Error) else None
                self.stats.record(time.monotonic_ns() - started, code)
        if frame.request_id:  # id 0: run, answer nothing, errors included (docs/protocol.md)
            self._reply(instance, reply, frame.request_id)

    def _call(self, instance: Instance, call: p.Call, fds: tuple[int, ...]) -> p.Message:
        assert self.loaded is not None  # noqa: S101 - instances exist only once loaded
        method = self.loaded.methods.get(call.method)
        if method is None:
            p.close_fds(fds)
            known = ", ".join(sorted(self.loaded.methods))
            message = f"{self.loaded.name} has no method {call.method!r}; methods: {known}"
            return p.Error(p.ErrorCode.UNKNOWN_METHOD, message)
        try:
            kwargs = method.bind(call, fds, instance.buffers)
        except (ValueError, msgspec.ValidationError) as exc:
            p.close_fds(fds)
            return p.Error(p.ErrorCode.BAD_ARGUMENTS, str(exc))
        buffers = [arg for arg in kwargs.values() if isinstance(arg, Buffer)]
        if self.beater is not None:
            self.beater.claim(method.label, instance.instance_id)
        modlog = self.modlog
        modlog.instance_id, modlog.method = instance.instance_id, call.method
        try:
            with self.module_code():
                try:
                    value = getattr(instance.module, call.method)(**kwargs)
                    reply: p.Message = p.Result(msgspec.to_builtins(value))
                except Exception as exc:  # noqa: BLE001 - the module's bug: the caller's error
                    details = {"exception": type(exc).__name__, "traceback": _short_traceback(exc)}
                    where = _raised_at(exc)
                    if where:
                        details["where"] = where
                    reply = p.Error(p.ErrorCode.MODULE_ERROR, _said(exc), details)
                    modlog.exception(instance.instance_id, call.method, exc, details["traceback"])
        finally:
            modlog.instance_id, modlog.method = 0, ""
            if not modlog.bridged:
                modlog.bridge()  # logging imported by this call: from the next record on
            for buffer in buffers:
                buffer.close()
        # A buffer refused for mapping is the caller's error, even if the module caught it.
        for buffer in buffers:
            if buffer.refused is not None:
                named: dict[str, Any] = {"fd_arg": buffer.name}
                if isinstance(buffer, RegisteredBuffer):
                    named["buffer_id"] = buffer.id
                return p.Error(p.ErrorCode.BAD_ARGUMENTS, str(buffer.refused), named)
        return reply

    def _reply(self, instance: Instance, message: p.Message, request_id: int) -> None:
        self._send_channel(instance, message, request_id)

    def _emit(self, instance: Instance, name: str, data: object) -> None:
        self._send_channel(instance, p.ModuleEvent(name, msgspec.to_builtins(data)), 0)

    def _send_channel(self, instance: Instance, message: p.Message, request_id: int) -> None:
        if instance.instance_id not in self.instances:
            return
        try:
            instance.sock.sendmsg([p.encode(message, request_id)], [], socket.MSG_DONTWAIT)
        except OSError as exc:
            # A client that stops reading must not stall every other instance of this worker.
            log("worker.channel_dropped", instance=instance.instance_id, error=exc.strerror)
            self._close_instance(instance.instance_id, notify="client does not read its channel")

    def _close_instance(self, instance_id: int, *, notify: str | None) -> None:
        """Free an instance; ``notify`` tells the daemon why when it did not ask for it."""
        instance = self.instances.pop(instance_id, None)
        if instance is None:
            return
        if notify is not None:
            try:
                self._send_control(p.InstanceClosed(instance_id, notify), 0)
            except OSError:
                self.running = False  # the daemon is gone
        self.handlers.pop(instance.sock.fileno(), None)
        self.epoll.unregister(instance.sock)
        instance.sock.close()
        if instance.module is not None:
            if self.beater is not None:
                self.beater.claim(CLOSE_LABEL, instance_id)
            with self.module_code():
                try:
                    instance.module.close()
                except Exception as exc:  # noqa: BLE001 - a failing close must not kill the worker
                    log("worker.close_failed", instance=instance_id, error=repr(exc))
        instance.buffers.close()  # after the module's close, which may still use them


def enable_crash_dumps(beater: Beater, board: int) -> None:
    """Have faulthandler write the stacks on the board: at a fatal signal, and on SIGUSR1.

    Before any module code runs, so a crash at import is reported too. The
    board is the one descriptor the daemon reads after the death, whether
    this worker was spawned or forked (ipad/worker/heartbeat_board.py).
    """
    dump = beater.dump_to(board)
    if dump is None:
        return
    faulthandler.enable(file=dump, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True, chain=False)


def _discard_event(name: str, data: object) -> None:
    """Events of the load-time probe instance go nowhere."""


def _short_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc, limit=-TRACEBACK_LIMIT)).rstrip()


def _said(exc: BaseException) -> str:
    """What an exception says: its str(), else its repr(), else its type's name.

    A module's exception whose ``__str__`` raises must fail its call, not the worker.
    """
    for show in (str, repr):
        try:
            text = show(exc)
        except Exception:  # noqa: BLE001, S112 - the module's __str__/__repr__ failed: try the next
            continue
        if text:
            return text
    return type(exc).__name__


def _raised_at(exc: BaseException) -> str:
    """``file:line in function`` where ``exc`` was raised (its innermost frame), or ""."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rpartition('/')[2]}:{tb.tb_lineno} in {code.co_name}"


def line_buffered_output() -> None:
    """Make stdout line-buffered and stderr unbuffered, as PYTHONUNBUFFERED would.

    A worker's output is a pipe: Python buffers it in blocks, so ``print()``
    lines would reach the daemon's log only at exit, and never after a
    SIGSEGV. ``python -I`` (the fork server, jailed workers) ignores
    PYTHONUNBUFFERED, so the worker runtime sets this up itself.
    """
    stdout = sys.stdout
    if isinstance(stdout, io.TextIOWrapper):
        stdout.reconfigure(line_buffering=True)
    stderr = sys.stderr
    if stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            stderr.flush()
        raw = io.FileIO(2, "w", closefd=False)
        encoding = getattr(stderr, "encoding", None) or "utf-8"
        sys.stderr = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace",
                                      line_buffering=True, write_through=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ipad-worker`` executable."""
    args = sys.argv[1:] if argv is None else argv
    parent = int(args[args.index("--parent-pid") + 1]) if "--parent-pid" in args else None
    # SIGHUP means "reload" to the daemon; sent to the whole service (systemctl kill -s HUP
    # ipad), it must not kill every worker. The fork server does the same.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getpid() == 1:
        # The first process of a PID namespace (a jailed worker, ipad/worker/jail.py) ignores
        # signals it has no handler for, even the daemon's SIGTERM: exit on it as others do.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        undumpable_after_exec()
    die_with_parent(parent)
    line_buffered_output()
    control = socket.socket(fileno=CONTROL_FD)
    return WorkerHost(control).serve()


def undumpable_after_exec() -> None:
    """Undo what the exec did: a jailed worker that switched user is dumpable again.

    The jail's clone drops root for the sandbox's ``user`` (``nobody`` by
    default), then execs this; exec makes a process dumpable again, so any
    other process of that user could trace it or read its memory, clients'
    buffers included. A forked worker never execs and stays undumpable. In a
    user namespace (an unprivileged daemon) the worker is the daemon's own
    user and the daemon must keep reading its /proc entries: left as is.
    """
    try:
        with open("/proc/self/uid_map", encoding="ascii") as uid_map:  # noqa: PTH123 - no pathlib
            initial = " ".join(uid_map.read().split()) == INITIAL_UID_MAP
    except OSError:
        return
    if initial and os.getuid() != 0:
        libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
