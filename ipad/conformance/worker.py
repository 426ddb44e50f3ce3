"""Worker mode: run a worker executable as ipad's daemon does and check it keeps protocol.md.

The kit is the daemon here: it makes the control socketpair, starts the
executable with its end on fd 3 and ``--parent-pid`` appended (a process
group of its own, fds 0-2 as a worker has them), passes a heartbeat board with
LOAD, and then plays each rule of "Worker control", "Calls on a channel" and
"Errors" against it. Lifecycle rules that end the worker (control EOF, SIGTERM,
parent death) each run on a fresh worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ipad.conformance.peer import Endpoint, Timeout, remaining, sealed_memfd
from ipad.conformance.procs import (
    MAX_OUTPUT,
    Child,
    describe_status,
    limit_output,
    spawn,
    spawn_orphanable,
)
from ipad.conformance.report import Report, bounded
from ipad.protocol import wire as p
from ipad.protocol.fdpass import sized_socketpair

#: The heartbeat board: two unsigned 64-bit counters (protocol.md, "Worker control").
BOARD_SIZE = 16
#: Unsolicited control messages kept for the report.
MAX_STRAY = 8
#: A method name no module has.
NO_SUCH_METHOD = "ipad_conformance_no_such_method"
#: The malformed packets sent on a channel, each on a channel of its own.
MALFORMED = (
    "bad_magic",
    "truncated",
    "short",
    "wrong_type",
    "bad_payload",
    "fd_mismatch",
    "too_many_fds",
)


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How to run and judge the worker."""

    argv: tuple[str, ...]
    module: str
    entry_point: str
    module_dir: str
    tuning: str
    start_timeout: float
    reply_timeout: float
    stop_timeout: float
    heartbeat_interval: float


class Ended(Exception):
    """The worker closed its control socket (or exited) while the kit waited for a reply."""


class WorkerUnderTest:
    """One started worker: its control socket, board, output and process, all owned here."""

    def __init__(self, options: WorkerOptions, *, orphanable: bool = False) -> None:
        self.options = options
        self.output = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.board: int | None = None
        self.go_between: Child | None = None
        self.next_id = 1
        #: INSTANCE_CLOSED seen for an instance the kit opened: instance id -> reason.
        self.closed: dict[int, str] = {}
        #: Instances the kit opened.
        self.opened: set[int] = set()
        #: What came that answered nothing the kit asked (type names), for the report.
        self.stray: list[str] = []
        self.strays = 0
        ours, theirs = sized_socketpair()
        self.control = Endpoint(ours, p.FROM_WORKER_CONTROL, "control")
        try:
            env = dict(os.environ)
            deadline = time.monotonic() + options.start_timeout
            if orphanable:
                self.go_between, self.child = spawn_orphanable(
                    options.argv,
                    env,
                    control=theirs.fileno(),
                    output=self.output.fileno(),
                    deadline=deadline,
                )
            else:
                pid = spawn(
                    options.argv,
                    env,
                    control=theirs.fileno(),
                    output=self.output.fileno(),
                    parent_pid=True,
                )
                self.child = Child(pid, "worker")
            limit_output(self.child.pid, MAX_OUTPUT)
        except BaseException:
            self.control.close()
            self.output.close()
            raise
        finally:
            theirs.close()

    def request(
        self, message: p.Message, timeout: float, fds: Sequence[int] = ()
    ) -> tuple[p.Frame, float]:
        """Send a request and read until its reply: (reply, seconds it took)."""
        request_id = self.next_id
        self.next_id += 1
        start = time.monotonic()
        deadline = start + timeout
        self.control.send(message, request_id, deadline, fds)
        while True:
            frame = self.control.receive(deadline)
            if frame is None:
                raise Ended("the worker closed its control socket")
            if frame.request_id == request_id:
                return frame, time.monotonic() - start
            self._unsolicited(frame)

    def _unsolicited(self, frame: p.Frame) -> None:
        frame.close_fds()
        message = frame.message
        if (
            isinstance(message, p.InstanceClosed)
            and message.instance_id in self.opened
            and message.instance_id not in self.closed
            and frame.request_id == 0
        ):
            self.closed[message.instance_id] = bounded(message.reason, 200)
        else:
            self.strays += 1
            if len(self.stray) < MAX_STRAY:  # a worker may send without end: keep the first few
                what = (
                    f" for instance {message.instance_id}"
                    if isinstance(message, p.InstanceClosed)
                    else ""
                )
                self.stray.append(f"{message.TYPE.name} id={frame.request_id}{what}")

    def tell(self, message: p.Message) -> None:
        """Send a message that expects no reply (id 0)."""
        self.control.send(message, 0, time.monotonic() + self.options.reply_timeout)

    def wait_closed(self, instance_id: int, timeout: float) -> str | None:
        """The reason of INSTANCE_CLOSED for ``instance_id`` if it comes in time."""
        deadline = time.monotonic() + timeout
        while instance_id not in self.closed:
            try:
                frame = self.control.receive(deadline)
            except Timeout:
                return None
            if frame is None:
                return None
            self._unsolicited(frame)
        return self.closed[instance_id]

    def load(self) -> tuple[p.Frame, float]:
        """LOAD with a heartbeat board (if an interval is set): the reply and its delay."""
        options = self.options
        fds: list[int] = []
        if options.heartbeat_interval > 0:
            self.board = os.memfd_create("ipad-conformance-board", os.MFD_CLOEXEC)
            os.ftruncate(self.board, BOARD_SIZE)
            fds.append(self.board)
        load = p.Load(
            options.module,
            options.entry_point,
            options.module_dir,
            options.tuning,
            heartbeat_interval=options.heartbeat_interval if fds else 0.0,
        )
        return self.request(load, options.start_timeout, fds)

    def beats(self) -> bytes:
        """The board's beat counter as it stands."""
        assert self.board is not None  # noqa: S101 - only asked after a LOAD with a board
        return os.pread(self.board, 8, 0)

    def open_instance(self, instance_id: int) -> tuple[Endpoint, p.Frame, float]:
        """OPEN_INSTANCE with a new channel: our end of it, the reply and its delay."""
        ours, theirs = sized_socketpair()
        self.opened.add(instance_id)
        try:
            frame, took = self.request(
                p.OpenInstance(instance_id), self.options.start_timeout, [theirs.fileno()]
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return Endpoint(ours, p.FROM_WORKER_CHANNEL, f"channel {instance_id}"), frame, took

    def output_tail(self, lines: int = 5) -> str:
        """The last lines the worker wrote on stdout and stderr, bounded."""
        self.output.seek(0, os.SEEK_END)
        size = self.output.tell()
        self.output.seek(max(0, size - 4096))
        text = self.output.read().decode(errors="replace")
        tail = " | ".join(text.splitlines()[-lines:])
        return f"; its output ends: {bounded(tail, 300)}" if tail else ""

    def wait_exit(self, timeout: float) -> int | None:
        """Its wait status if it exits within ``timeout`` seconds."""
        return self.child.wait(time.monotonic() + timeout)

    def close(self) -> None:
        """Kill and reap the worker (and its go-between), close everything of it."""
        self.control.close()
        self.child.kill()
        if self.go_between is not None:
            self.go_between.kill()
        if self.board is not None:
            os.close(self.board)
            self.board = None  # closed once: its number may be reused
        self.output.close()


class Channel:
    """The kit's end of one instance's channel: calls with ids and a deadline."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.next_id = 1

    def call(
        self,
        method: str,
        args: dict[str, Any] | None = None,
        fds: Sequence[int] = (),
        fd_args: Sequence[str] | None = None,
    ) -> p.Frame | None:
        """CALL and its reply (module events skipped); None if the channel ended."""
        names = tuple(fd_args) if fd_args is not None else ()
        request_id = self.next_id
        self.next_id += 1
        deadline = time.monotonic() + self.timeout
        self.endpoint.send(p.Call(method, args or {}, names), request_id, deadline, fds)
        return self.reply(request_id, deadline)

    def reply(self, request_id: int, deadline: float) -> p.Frame | None:
        """The reply to ``request_id``; None at end of stream."""
        while True:
            frame = self.endpoint.receive(deadline)
            if frame is None or frame.request_id == request_id:
                return frame
            frame.close_fds()  # a MODULE_EVENT, or a stray reply: not what this rule checks

    def close(self) -> None:
        """Close the kit's end."""
        self.endpoint.close()


def describe(frame: p.Frame | None) -> str:
    """A received message in a few words, for the report."""
    if frame is None:
        return "end of stream"
    message = frame.message
    if isinstance(message, p.Error):
        return f"ERROR {message.code}: {message.message}"
    if isinstance(message, p.Result):
        return f"RESULT {message.value!r}"
    return f"{message.TYPE.name} id={frame.request_id}"


def is_error(frame: p.Frame | None, code: str) -> bool:
    """Whether ``frame`` is an ERROR with ``code``."""
    return frame is not None and isinstance(frame.message, p.Error) and frame.message.code == code


def crc_text(size: int) -> bytes:
    """Distinctive bytes to checksum: no two offsets alike within a page."""
    return bytes((i * 7 + i // 251) & 0xFF for i in range(size))


def check_ready(
    report: Report, options: WorkerOptions, worker: WorkerUnderTest, ready: p.Ready
) -> None:
    """READY's fields: the module asked for, a version, well-formed methods, the worker's pid."""
    problems = []
    if ready.module != options.module:
        problems.append(f"module {ready.module!r}, LOAD asked for {options.module!r}")
    if not ready.version or len(ready.version) > 64:
        problems.append(f"version {ready.version!r} is not 1..64 characters")
    names = [m.name for m in ready.methods]
    if not names:
        problems.append("no methods")
    if any(not n or len(n) > 128 for n in names):
        problems.append("a method name is empty or longer than 128 characters")
    if len(set(names)) != len(names):
        problems.append("a method is listed twice")
    for method in ready.methods:
        if method.undoes is not None and method.undoes not in names:
            problems.append(f"{method.name!r} undoes {method.undoes!r}, which it does not list")
    if ready.pid != worker.child.pid:
        problems.append(f"pid {ready.pid}, but the worker's pid is {worker.child.pid}")
    setup = [m.name for m in ready.methods if m.setup]
    seen = (
        f"module {ready.module!r} version {ready.version!r}, {len(names)} methods "
        f"({', '.join(names[:12])}), setup: {', '.join(setup) or 'none'}, beats: {ready.beats}"
    )
    report.add("ready.fields", not problems, "; ".join(problems) if problems else seen)


def start_loaded(
    report: Report, options: WorkerOptions, rule: str, *, orphanable: bool = False
) -> WorkerUnderTest | None:
    """A fresh worker, loaded, for a rule that ends it; None (rule failed) if it did not serve."""
    try:
        worker = WorkerUnderTest(options, orphanable=orphanable)
    except (OSError, ValueError, TimeoutError) as exc:
        report.add(rule, False, f"could not start the worker: {exc}")
        return None
    try:
        frame, _ = worker.load()
    except (Ended, Timeout, p.ProtocolError, OSError) as exc:
        report.add(
            rule, False, f"the fresh worker did not answer LOAD: {exc}{worker.output_tail()}"
        )
        worker.close()
        return None
    if not isinstance(frame.message, p.Ready):
        report.add(rule, False, f"the fresh worker answered LOAD with {describe(frame)}")
        worker.close()
        return None
    return worker


def run_worker(options: WorkerOptions, report: Report) -> None:
    """Every worker rule, in order; each rule that cannot run is SKIPped with the reason."""
    main_rules = (
        "load.ready",
        "ready.fields",
        "heartbeat",
        "instance.open",
        "call.unknown_method",
        "call.serves_after_error",
        "method.echo",
        "call.bad_arguments",
        "method.checksum",
        "buffer.unsealed_refused",
        "call.fd_count",
        *(f"malformed.{case}" for case in MALFORMED),
        "malformed.others_unaffected",
        "channel.eof",
        "close_instance",
        "control.unsolicited",
        "shutdown.exit",
    )
    try:
        worker = WorkerUnderTest(options)
    except (OSError, ValueError) as exc:
        report.add("start", False, f"could not start {options.argv[0]!r}: {exc}")
        for rule in main_rules:
            report.skip(rule, "the worker did not start")
        for rule in ("control_eof.exit", "sigterm.exit", "parent_death.exit"):
            report.skip(rule, "the worker did not start")
        return
    report.add(
        "start",
        True,
        f"pid {worker.child.pid}: {' '.join(options.argv)} --parent-pid {os.getpid()}",
    )
    try:
        _main_worker(options, report, worker)
    finally:
        worker.close()
        for rule in main_rules:
            if rule not in {o.rule for o in report.outcomes}:
                report.skip(rule, "an earlier rule it needs failed")
    loaded = any(o.rule == "load.ready" and o.verdict == "PASS" for o in report.outcomes)
    for rule, run in (
        ("control_eof.exit", _control_eof),
        ("sigterm.exit", _sigterm),
        ("parent_death.exit", _parent_death),
    ):
        if not loaded:
            report.skip(rule, "load.ready failed")
            continue
        run(options, report, rule)


def _main_worker(options: WorkerOptions, report: Report, worker: WorkerUnderTest) -> None:
    try:
        frame, took = worker.load()
    except (Ended, Timeout, p.ProtocolError, OSError) as exc:
        status = worker.wait_exit(0.2)
        gone = "" if status is None else f" ({describe_status(status)})"
        report.add(
            "load.ready",
            False,
            f"no READY within {options.start_timeout:g} s: {exc}{gone}{worker.output_tail()}",
        )
        return
    if not isinstance(frame.message, p.Ready):
        report.add(
            "load.ready", False, f"LOAD answered with {describe(frame)}{worker.output_tail()}"
        )
        return
    ready = frame.message
    report.add(
        "load.ready", True, f"READY in {took * 1000:.0f} ms (bound {options.start_timeout:g} s)"
    )
    check_ready(report, options, worker, ready)
    _heartbeat(options, report, worker, ready)
    methods = {m.name for m in ready.methods}
    main: Channel | None = None
    try:
        endpoint, frame, took = worker.open_instance(1)
        main = Channel(endpoint, options.reply_timeout)
        ok = isinstance(frame.message, p.InstanceOpened) and frame.message.instance_id == 1
        if not report.add("instance.open", ok, f"{describe(frame)} in {took * 1000:.0f} ms"):
            main.close()
            return
        _calls(report, main, methods)
        _malformed(options, report, worker, main, methods)
        _channel_end(options, report, worker)
        _close_instance(options, report, worker, main, methods)
    except (Ended, Timeout, p.ProtocolError, OSError) as exc:
        rule = f"(after {report.outcomes[-1].rule})"
        report.add(
            "worker.serves", False, f"{rule}: {type(exc).__name__}: {exc}{worker.output_tail()}"
        )
        if main is not None:
            main.close()
        return
    report.add(
        "control.unsolicited",
        not worker.stray,
        "none"
        if not worker.stray
        else f"{worker.strays} messages that answer nothing: {', '.join(worker.stray)}, …",
    )
    worker.tell(p.Shutdown())
    status = worker.wait_exit(options.stop_timeout)
    report.add(
        "shutdown.exit",
        status is not None,
        f"{describe_status(status)} after SHUTDOWN (bound {options.stop_timeout:g} s)",
    )
    main.close()


def _heartbeat(
    options: WorkerOptions, report: Report, worker: WorkerUnderTest, ready: p.Ready
) -> None:
    if ready.beats and worker.board is not None:
        first = worker.beats()
        bound = max(2.0, 4 * options.heartbeat_interval)  # slack for a loaded machine
        deadline = time.monotonic() + bound
        while worker.beats() == first and remaining(deadline) > 0:
            time.sleep(min(0.02, remaining(deadline)))
        moved = worker.beats() != first
        report.add(
            "heartbeat",
            moved,
            f"board counter {'moved' if moved else 'did not move'} "
            f"while idle (interval {options.heartbeat_interval:g} s, bound {bound:g} s)",
        )
        return
    try:
        frame, took = worker.request(p.Ping(), options.reply_timeout)
    except (Ended, Timeout, p.ProtocolError) as exc:
        report.add("heartbeat", False, f"beats: false, and PING got no PONG: {exc}")
        return
    ok = isinstance(frame.message, p.Pong)
    report.add(
        "heartbeat",
        ok,
        f"beats: false; PING answered with {describe(frame)} in {took * 1000:.0f} ms",
    )


def _calls(report: Report, main: Channel, methods: set[str]) -> None:
    reply = main.call(NO_SUCH_METHOD)
    report.add("call.unknown_method", is_error(reply, "unknown_method"), describe(reply))
    if "echo" in methods:
        text = "conformance ✓ " + "x" * 100
        reply = main.call("echo", {"text": text})
        ok = (
            reply is not None
            and isinstance(reply.message, p.Result)
            and reply.message.value == {"text": text}
        )
        report.add(
            "call.serves_after_error",
            reply is not None and isinstance(reply.message, p.Result),
            f"echo after the error: {describe(reply)}",
        )
        report.add("method.echo", ok, f"echo(text) -> {describe(reply)}")
        bad = [
            main.call("echo", {"text": 5}),
            main.call("echo", {"text": "x", "ipad_conformance_unknown": 1}),
            main.call("echo"),
        ]
        ok = all(is_error(r, "bad_arguments") for r in bad)
        report.add(
            "call.bad_arguments",
            ok,
            "text=5, an unknown argument, none: " + "; ".join(describe(r) for r in bad),
        )
    else:
        reply = main.call(NO_SUCH_METHOD)
        report.add(
            "call.serves_after_error",
            is_error(reply, "unknown_method"),
            f"a second unknown call: {describe(reply)}",
        )
        report.skip("method.echo", "READY lists no echo")
        report.skip("call.bad_arguments", "READY lists no echo to call wrongly")
    if "checksum" not in methods:
        for rule in ("method.checksum", "buffer.unsealed_refused", "call.fd_count"):
            report.skip(rule, "READY lists no checksum")
        return
    data = crc_text(3 * 4096 + 123)
    with _memfd(data) as fd:
        reply = main.call("checksum", fds=[fd], fd_args=["data"])
    want = {"size": len(data), "crc32": zlib.crc32(data)}
    ok = reply is not None and isinstance(reply.message, p.Result) and reply.message.value == want
    report.add(
        "method.checksum", ok, f"sealed memfd of {len(data)} bytes, want {want}: {describe(reply)}"
    )
    with _memfd(data, seals=0) as fd:
        reply = main.call("checksum", fds=[fd], fd_args=["data"])
    report.add(
        "buffer.unsealed_refused",
        is_error(reply, "bad_arguments"),
        f"a memfd without F_SEAL_SHRINK: {describe(reply)}",
    )
    with _memfd(data) as fd:
        reply = main.call("checksum", fds=[fd], fd_args=[])
    report.add(
        "call.fd_count", is_error(reply, "bad_arguments"), f"one fd, fd_args []: {describe(reply)}"
    )


@contextlib.contextmanager
def _memfd(data: bytes, seals: int | None = None) -> Iterator[int]:
    fd = sealed_memfd(data) if seals is None else sealed_memfd(data, seals)
    try:
        yield fd
    finally:
        os.close(fd)


def malformed_packet(case: str) -> tuple[bytes, int]:  # noqa: PLR0911 - one per case
    """A broken packet for a channel, and how many fds to pass with it."""
    call = p.encode(p.Call(NO_SUCH_METHOD), 9)
    if case == "bad_magic":
        return b"XX" + call[2:], 0
    if case == "truncated":
        return call[: p.HEADER_SIZE + 1], 0
    if case == "short":
        return call[:10], 0
    if case == "wrong_type":
        return p.encode(p.Hello((p.PROTOCOL_VERSION,)), 9), 0
    if case == "bad_payload":
        return p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.MsgType.CALL, 0, 0, 9, 1) + b"\xc1", 0
    if case == "fd_mismatch":
        return call, 1  # the header says 0 fds, one comes
    if case == "too_many_fds":
        header = p.HEADER.pack(
            p.MAGIC,
            p.PROTOCOL_VERSION,
            p.MsgType.CALL,
            0,
            p.MAX_FDS + 1,
            9,
            len(call) - p.HEADER_SIZE,
        )
        return header + call[p.HEADER_SIZE :], p.MAX_FDS + 1
    raise ValueError(case)


def _malformed(
    options: WorkerOptions,
    report: Report,
    worker: WorkerUnderTest,
    main: Channel,
    methods: set[str],
) -> None:
    for number, case in enumerate(MALFORMED, start=100):
        endpoint, frame, _ = worker.open_instance(number)
        if not isinstance(frame.message, p.InstanceOpened):
            report.add(f"malformed.{case}", False, f"OPEN_INSTANCE {number}: {describe(frame)}")
            endpoint.close()
            continue
        packet, nfds = malformed_packet(case)
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(nfds)]
        try:
            endpoint.send_raw(packet, time.monotonic() + options.reply_timeout, fds)
        finally:
            for fd in fds:
                os.close(fd)
        deadline = time.monotonic() + options.reply_timeout
        seen: list[str] = []
        ok = False
        try:
            while True:
                reply = endpoint.receive(deadline)
                seen.append(describe(reply))
                if reply is None:
                    reason = worker.wait_closed(number, options.reply_timeout)
                    ok = reason is not None
                    seen.append(f"INSTANCE_CLOSED {reason!r}" if ok else "no INSTANCE_CLOSED")
                    break
                if not isinstance(reply.message, p.Error) or reply.message.code != "bad_message":
                    break  # anything else answers the broken packet wrongly
                ok = True  # ERROR bad_message; the channel may then end, which is read on
                deadline = min(deadline, time.monotonic() + 0.2)
        except Timeout:
            if not seen:
                seen.append(f"no answer within {options.reply_timeout:g} s")
        except p.ProtocolError as exc:
            ok = False
            seen.append(f"a broken reply: {exc.reason}")
        finally:
            endpoint.close()
        report.add(f"malformed.{case}", ok, " then ".join(seen))
    probe = main.call("echo", {"text": "still"}) if "echo" in methods else main.call(NO_SUCH_METHOD)
    alive = worker.child.alive()
    ok = (
        alive
        and probe is not None
        and (
            isinstance(probe.message, p.Result)
            if "echo" in methods
            else is_error(probe, "unknown_method")
        )
    )
    report.add(
        "malformed.others_unaffected",
        ok,
        f"the first channel: {describe(probe)}; worker {'alive' if alive else 'gone'}",
    )


def _channel_end(options: WorkerOptions, report: Report, worker: WorkerUnderTest) -> None:
    endpoint, frame, _ = worker.open_instance(2)
    if not isinstance(frame.message, p.InstanceOpened):
        report.add("channel.eof", False, f"OPEN_INSTANCE 2: {describe(frame)}")
        endpoint.close()
        return
    endpoint.close()
    reason = worker.wait_closed(2, options.reply_timeout)
    report.add(
        "channel.eof",
        reason is not None,
        f"INSTANCE_CLOSED {{instance_id: 2, reason: {reason!r}}}"
        if reason is not None
        else f"no INSTANCE_CLOSED within {options.reply_timeout:g} s of closing the channel",
    )


def _close_instance(
    options: WorkerOptions,
    report: Report,
    worker: WorkerUnderTest,
    main: Channel,
    methods: set[str],
) -> None:
    endpoint, frame, _ = worker.open_instance(3)
    if not isinstance(frame.message, p.InstanceOpened):
        report.add("close_instance", False, f"OPEN_INSTANCE 3: {describe(frame)}")
        endpoint.close()
        return
    worker.tell(p.CloseInstance(3))
    try:
        end = endpoint.receive(time.monotonic() + options.reply_timeout)
        seen = describe(end)
    except Timeout:
        end, seen = p.Frame(p.Pong()), f"channel still open {options.reply_timeout:g} s later"
    finally:
        endpoint.close()
    probe = (
        main.call("echo", {"text": "after close"})
        if "echo" in methods
        else main.call(NO_SUCH_METHOD)
    )
    ok = end is None and probe is not None and worker.child.alive()
    report.add(
        "close_instance", ok, f"CLOSE_INSTANCE 3: {seen}; the first channel then: {describe(probe)}"
    )


def _ended_by(
    options: WorkerOptions,
    report: Report,
    rule: str,
    action: Callable[[WorkerUnderTest], str],
    *,
    orphanable: bool = False,
) -> None:
    worker = start_loaded(report, options, rule, orphanable=orphanable)
    if worker is None:
        return
    try:
        what = action(worker)
        status = worker.wait_exit(options.stop_timeout)
        report.add(
            rule,
            status is not None,
            f"{describe_status(status)} after {what} (bound {options.stop_timeout:g} s)",
        )
    finally:
        worker.close()


def _control_eof(options: WorkerOptions, report: Report, rule: str) -> None:
    def close_control(worker: WorkerUnderTest) -> str:
        worker.control.close()
        return "its control socket was closed"

    _ended_by(options, report, rule, close_control)


def _sigterm(options: WorkerOptions, report: Report, rule: str) -> None:
    def terminate(worker: WorkerUnderTest) -> str:
        os.kill(worker.child.pid, signal.SIGTERM)
        return "SIGTERM"

    _ended_by(options, report, rule, terminate)


def _parent_death(options: WorkerOptions, report: Report, rule: str) -> None:
    def kill_parent(worker: WorkerUnderTest) -> str:
        assert worker.go_between is not None  # noqa: S101 - started orphanable
        worker.go_between.kill()
        return "its parent (the --parent-pid process) was SIGKILLed"

    _ended_by(options, report, rule, kill_parent, orphanable=True)
