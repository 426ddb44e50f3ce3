"""Client mode: run a client program against a real ipad daemon, then against a fake one.

Real daemon: a private daemon (its own socket, a temporary configuration
enabling the shipped ``echo`` module) serves the client, and the kit kills the
echo worker several times while the client runs; the client must recover and
print every line (the contract: docs/conformance.md). Fake daemon: the kit
itself answers, once as a newer peer (unknown fields everywhere), once with a
broken packet, which the client must refuse promptly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import select
import signal
import socket
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ipad.conformance.peer import (
    WRITE_SEALS,
    Endpoint,
    Timeout,
    encode_with_extras,
    read_buffer,
    remaining,
    wait_fd,
)
from ipad.conformance.procs import (
    MAX_OUTPUT,
    Child,
    describe_status,
    exited_cleanly,
    limit_output,
    resolve,
    spawn,
)
from ipad.conformance.report import Report, bounded
from ipad.protocol import wire as p
from ipad.protocol.fdpass import size_send_buffer, sized_socketpair

#: Bytes of each frame's buffer: "frame-<i>" repeated and cut to this size.
BUFFER_SIZE = 4096
#: How long the daemon may take to start and run echo.
DAEMON_START = 30.0
#: How long the daemon may take to stop on SIGTERM.
DAEMON_STOP = 15.0
#: Waits of the kit on the daemon (a reply, an event).
DAEMON_REPLY = 10.0
#: The client must refuse a broken packet within this (the brief's, and the docs').
MALFORMED_BOUND = 5.0
#: Lines of a client's output kept: a hostile client may print without end.
MAX_LINES = 10_000
#: Calls the client makes against the fake daemon.
FAKE_CALLS = 3
#: Seconds a run against the fake daemon may take: a few calls, no recovery.
FAKE_TIMEOUT = 10.0
#: What a newer peer adds to its messages: fields this version does not know.
EXTRAS: dict[str, Any] = {"minor": 99, "ipad_conformance_future": {"nested": [1, "two", None]}}


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """How to run and judge the client."""

    argv: tuple[str, ...]
    calls: int
    kills: int
    timeout: float


def frame_text(i: int) -> str:
    """The text of frame ``i``."""
    return f"frame-{i}"


def frame_bytes(i: int) -> bytes:
    """The buffer of frame ``i``: its text repeated, cut to BUFFER_SIZE bytes."""
    text = frame_text(i).encode()
    return (text * (BUFFER_SIZE // len(text) + 1))[:BUFFER_SIZE]


def expected_line(i: int) -> str:
    """The line the client must print for frame ``i``."""
    return f"{i} {frame_text(i)} {zlib.crc32(frame_bytes(i))}"


def check_lines(lines: list[str], count: int) -> tuple[bool, str]:
    """Whether ``lines`` are exactly the ``count`` expected ones, and what was seen."""
    for i, line in enumerate(lines[:count]):
        if line != expected_line(i):
            return False, f"line {i} is {line!r}, want {expected_line(i)!r}"
    if len(lines) != count:
        return False, f"{len(lines)} lines, want {count}"
    return True, f"{count} lines, each `<i> frame-<i> <crc32>` correct, in order"


class Output:
    """A client's stdout read line by line as it comes; its stderr kept in a file."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fcntl.fcntl(self.write_end, fcntl.F_SETFL, 0)  # the client's end blocks, as stdout does
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.lines: list[str] = []
        self.partial = b""
        self.eof = False

    def pump(self) -> None:
        """Take whatever has been written, without waiting."""
        while not self.eof:
            try:
                chunk = os.read(self.read_end, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.partial += chunk
            *done, self.partial = self.partial.split(b"\n")
            room = MAX_LINES - len(self.lines)
            self.lines += [line.decode(errors="replace")[:200] for line in done[:room]]
            self.partial = self.partial[-4096:]

    def stderr_tail(self) -> str:
        """The end of what the client wrote on stderr, bounded."""
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - 2048))
        text = " | ".join(self.stderr.read().decode(errors="replace").splitlines()[-4:])
        return f"; its stderr ends: {bounded(text, 300)}" if text else ""

    def close(self) -> None:
        """Close both pipe ends and the stderr file."""
        for fd in (self.read_end, self.write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.stderr.close()


def start_client(options: ClientOptions, sock: Path, calls: int) -> tuple[Child, Output]:
    """The client program, with IPAD_SOCKET and IPAD_CONFORMANCE_CALLS set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env["IPAD_SOCKET"] = str(sock)
    env["IPAD_CONFORMANCE_CALLS"] = str(calls)
    output = Output()
    try:
        pid = spawn(options.argv, env, stdout=output.write_end, output=output.stderr.fileno())
    except BaseException:
        output.close()
        raise
    os.close(output.write_end)
    limit_output(pid, MAX_OUTPUT)
    return Child(pid, "client"), output


# --- the real daemon ------------------------------------------------------------------


class Monitor:
    """The kit's own connection to the daemon: STATUS, and every EVENT kept."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.events: list[p.Event] = []
        self.next_id = 1
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if remaining(deadline) <= 0:
                    raise
                time.sleep(0.05)
        size_send_buffer(sock)
        self.endpoint = Endpoint(sock, p.FROM_DAEMON, "daemon")
        self.request(p.Hello((p.PROTOCOL_VERSION,), "ipad-conformance"))
        self.request(p.Subscribe())

    def request(self, message: p.Message) -> p.Message:
        """Send a request; its reply (EVENTs read meanwhile are kept)."""
        request_id = self.next_id
        self.next_id += 1
        deadline = time.monotonic() + DAEMON_REPLY
        self.endpoint.send(message, request_id, deadline)
        while True:
            frame = self.endpoint.receive(deadline)
            if frame is None:
                raise OSError("the daemon closed the kit's connection")
            frame.close_fds()
            if isinstance(frame.message, p.Event):
                self.events.append(frame.message)
            elif frame.request_id == request_id:
                return frame.message

    def status(self) -> p.StatusReply:
        """The daemon's STATUS_REPLY."""
        reply = self.request(p.Status())
        if not isinstance(reply, p.StatusReply):
            raise OSError(f"STATUS answered with {reply.TYPE.name}")
        return reply

    def wait_event(self, matches: Callable[[p.Event], bool], timeout: float) -> p.Event | None:
        """The first kept or new event that ``matches``, within ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if matches(event):
                    return event
            seen = len(self.events)
            try:
                frame = self.endpoint.receive(deadline)
            except Timeout:
                return None
            if frame is None:
                return None
            if isinstance(frame.message, p.Event):
                self.events.append(frame.message)

    def close(self) -> None:
        """Close the connection."""
        self.endpoint.close()


class Daemon:
    """A private ipad daemon in a temporary directory, stopped with SIGTERM at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "ipad.sock"
        self.log = directory / "daemon.log"
        config = directory / "config.toml"
        # Several kills inside a minute must not put echo in cooldown.
        config.write_text("[restart]\nmax_failures = 100\n\n[modules.echo]\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
        env["IPAD_SOCKET"] = str(self.socket)
        argv = [
            sys.executable,
            "-m",
            "ipad",
            "--config",
            str(config),
            "--log-format",
            "json",
            "--log-level",
            "info",
        ]
        with self.log.open("wb") as log, open(os.devnull, "wb") as null:  # noqa: PTH123
            self.child = Child(
                spawn(argv, env, stdout=null.fileno(), output=log.fileno()), "daemon"
            )

    def log_tail(self) -> str:
        """Its last log lines, bounded."""
        lines = self.log.read_text(errors="replace").splitlines()[-3:]
        return f"; its log ends: {bounded(' | '.join(lines), 400)}"

    def stop(self) -> str | None:
        """SIGTERM, then wait; what went wrong, if anything (then it is killed)."""
        if self.child.status is not None:
            return f"the daemon had ended: {describe_status(self.child.status)}"
        os.kill(self.child.pid, signal.SIGTERM)
        status = self.child.wait(time.monotonic() + DAEMON_STOP)
        if status is None:
            self.child.kill()
            return f"the daemon did not stop within {DAEMON_STOP:g} s of SIGTERM: killed"
        return None if status == 0 else f"the daemon stopped with {describe_status(status)}"


def wait_running(monitor: Monitor, deadline: float) -> int:
    """The echo worker's pid once the module runs."""
    while True:
        echo = monitor.status().modules.get("echo", {})
        if echo.get("state") == "running" and isinstance(echo.get("worker_pid"), int):
            return int(echo["worker_pid"])
        if remaining(deadline) <= 0:
            raise TimeoutError(f"echo is {echo.get('state')!r}, not running")
        time.sleep(0.05)


def run_real(options: ClientOptions, report: Report, directory: Path) -> None:
    """The client against a real daemon whose echo worker the kit kills K times."""
    rules = ("client.exit", "client.lines", "client.recovered", "client.released")
    daemon = Daemon(directory)
    monitor: Monitor | None = None
    try:
        deadline = time.monotonic() + DAEMON_START
        try:
            monitor = Monitor(daemon.socket, deadline)
            wait_running(monitor, deadline)
        except (OSError, TimeoutError, Timeout, p.ProtocolError) as exc:
            report.add(
                "kit.daemon",
                False,
                f"the kit's own daemon did not serve echo: {exc}{daemon.log_tail()}",
            )
            for rule in rules:
                report.skip(rule, "the kit's daemon did not start")
            return
        _drive_real(options, report, daemon, monitor)
    finally:
        if monitor is not None:
            monitor.close()
        problem = daemon.stop()
        if problem is not None:
            report.add("kit.daemon_stop", False, problem + daemon.log_tail())


def _drive_real(options: ClientOptions, report: Report, daemon: Daemon, monitor: Monitor) -> None:
    calls = options.calls
    kill_at = [calls * (j + 1) // (options.kills + 1) for j in range(options.kills)]
    landed: list[tuple[int, p.Event | None]] = []  # (killed pid, its invalid event)
    late = 0
    client, output = start_client(options, daemon.socket, calls)
    try:
        deadline = time.monotonic() + options.timeout
        poller = select.poll()
        poller.register(output.read_end, select.POLLIN)
        poller.register(client.pidfd, select.POLLIN)
        watching_output = True
        while remaining(deadline) > 0:
            poller.poll(max(1, int(remaining(deadline) * 1000)))
            output.pump()
            if output.eof and watching_output:  # a closed pipe polls readable for ever
                poller.unregister(output.read_end)
                watching_output = False
            while kill_at and len(output.lines) >= kill_at[0]:
                kill_at.pop(0)
                client.signal(signal.SIGSTOP)
                try:
                    output.pump()  # what it printed before it stopped
                    if len(output.lines) >= calls or not client.alive():
                        late += 1
                        continue
                    pid = wait_running(monitor, time.monotonic() + DAEMON_REPLY)
                    os.kill(pid, signal.SIGKILL)
                    event = monitor.wait_event(
                        lambda e, pid=pid: (
                            e.kind == "proxy"
                            and e.state == "invalid"  # type: ignore[misc]
                            and e.worker_pid == pid
                        ),
                        DAEMON_REPLY,
                    )
                    landed.append((pid, event))
                finally:
                    client.signal(signal.SIGCONT)
            if not client.alive() and output.eof:
                break
            if not client.alive():
                output.pump()
                if not wait_fd(output.read_end, select.POLLIN, min(deadline, time.monotonic() + 1)):
                    break  # it ended, and something it started holds its stdout: enough
        status = client.wait(time.monotonic())
        output.pump()
        report.add(
            "client.exit",
            status == 0,
            f"{describe_status(status)} (bound {options.timeout:g} s)"
            + ("" if status == 0 else output.stderr_tail()),
        )
        report.add("client.lines", *check_lines(output.lines, calls))
        _recovered(report, monitor, landed, late)
        if status is None:
            client.kill()
        _released(report, monitor)
    finally:
        client.kill()
        output.close()


def _recovered(
    report: Report,
    monitor: Monitor,
    landed: list[tuple[int, p.Event | None]],
    late: int,
) -> None:
    if not landed:
        report.skip(
            "client.recovered",
            f"no kill landed while the client ran ({late} came after its last line)"
            if late
            else "the client never printed enough lines for a kill to be due",
        )
        return
    monitor.wait_event(lambda e: False, 0.2)  # take the events that are in
    problems = []
    for pid, invalid in landed:
        if invalid is None:
            problems.append(f"the daemon published no invalid proxy after worker {pid} was killed")
            continue
        valid = [
            e
            for e in monitor.events
            if e.kind == "proxy"
            and e.proxy_id == invalid.proxy_id
            and e.seq > invalid.seq
            and e.state == "valid"
        ]
        if not valid:
            problems.append(
                f"proxy {invalid.proxy_id} never became valid again after worker {pid} died "
                "(no REOPEN_PROXY + PROXY_READY)"
            )
        elif valid[0].reason != "recovered" or not valid[0].details.get("replayed"):
            problems.append(
                f"proxy {invalid.proxy_id} back as {valid[0].reason!r} with "
                f"details {valid[0].details}: PROXY_READY should say replayed: 1"
            )
    note = f" ({late} more came after its last line)" if late else ""
    report.add(
        "client.recovered",
        not problems,
        "; ".join(problems)
        if problems
        else f"{len(landed)} kills mid-run, each followed by REOPEN_PROXY, the init replay and "
        f"PROXY_READY (proxy valid again, reason 'recovered', replayed ≥ 1){note}",
    )


def _released(report: Report, monitor: Monitor) -> None:
    deadline = time.monotonic() + 2.0
    proxies = monitor.status().daemon.get("proxies")
    while proxies != 0 and remaining(deadline) > 0:
        time.sleep(0.05)
        proxies = monitor.status().daemon.get("proxies")
    report.add(
        "client.released",
        proxies == 0,
        f"{proxies} proxies left on the daemon after the client ended",
    )


# --- the fake daemon -------------------------------------------------------------------


class FakeDaemon:
    """A listening socket the kit answers on itself, as a newer or a broken daemon."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "fake.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(str(self.path))
        self.listener.listen(4)

    def accept(self, deadline: float) -> Endpoint | None:
        """The client's connection, if it connects in time."""
        if not wait_fd(self.listener.fileno(), select.POLLIN, deadline):
            return None
        sock, _ = self.listener.accept()
        size_send_buffer(sock)
        return Endpoint(sock, p.FROM_CLIENT, "client")

    def close(self) -> None:
        """Stop listening."""
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclasses.dataclass
class Trace:
    """What the client did against the fake daemon, in order, and what broke the contract."""

    steps: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    ids: set[tuple[str, int]] = dataclasses.field(default_factory=set)

    def request_id(self, where: str, request_id: int, *, reply: bool = True) -> None:
        """A request id must be new on its connection, and not 0 for a request."""
        if reply and request_id == 0:
            self.problems.append(f"a request with id 0 on the {where}")
        if (where, request_id) in self.ids and request_id:
            self.problems.append(f"request id {request_id} used twice on the {where}")
        self.ids.add((where, request_id))


def serve_fake(options: ClientOptions, report: Report, directory: Path, *, newer: bool) -> None:
    """Be the daemon (and the echo worker) for a short run, as this version or a newer minor.

    As this version: every step of the contract is checked in order (``client.contract``).
    As a newer minor: every message carries fields this version does not know, which
    the client must ignore (``client.newer_peer``).
    """
    extras = EXTRAS if newer else {}
    fake = FakeDaemon(directory)
    client, output = start_client(options, fake.path, FAKE_CALLS)
    trace = Trace()
    conn: Endpoint | None = None
    channel: Endpoint | None = None
    try:
        deadline = time.monotonic() + min(options.timeout, FAKE_TIMEOUT)
        conn = fake.accept(deadline)
        if conn is None:
            trace.problems.append("the client never connected")
        else:
            channel = _fake_session(conn, trace, deadline, extras)
        status = client.wait(deadline)
        output.pump()
        ok_lines, lines_seen = check_lines(output.lines, FAKE_CALLS)
        ok = status == 0 and ok_lines and not trace.problems
        seen = f"{describe_status(status)}; {lines_seen}"
        if newer:
            fields = ", ".join(sorted(extras))
            seen = f"every message with unknown fields ({fields}): {seen}"
        if trace.problems:
            seen += "; " + "; ".join(trace.problems)
        elif not newer:
            seen += "; " + " → ".join(trace.steps)
        report.add(
            "client.newer_peer" if newer else "client.contract",
            ok,
            seen + ("" if ok else output.stderr_tail()),
        )
    finally:
        client.kill()
        output.close()
        for end in (conn, channel):
            if end is not None:
                end.close()
        fake.close()


def _fake_session(
    conn: Endpoint, trace: Trace, deadline: float, extras: dict[str, Any]
) -> Endpoint | None:
    """Answer the client until it leaves; the channel the kit served, if any."""
    worker_end: Endpoint | None = None
    state = {"hello": False, "subscribed": False, "calls": 0, "released": False, "goodbye": False}
    while remaining(deadline) > 0:
        ready = _ready([conn] + ([worker_end] if worker_end else []), deadline)
        if conn in ready:
            try:
                frame = conn.receive(deadline)
            except p.ProtocolError as exc:
                trace.problems.append(f"a broken packet to the daemon: {exc.reason}")
                return worker_end
            if frame is None:
                if not state["released"]:
                    trace.problems.append("the connection ended without RELEASE_PROXY")
                elif not state["goodbye"]:
                    trace.problems.append("the connection ended without GOODBYE")
                return worker_end
            frame.close_fds()
            reply = _fake_daemon_reply(frame, trace, state)
            if isinstance(reply, p.ProxyGranted):
                ours, theirs = sized_socketpair()
                worker_end = Endpoint(ours, p.TO_WORKER_CHANNEL, "channel")
                conn.send_raw(
                    encode_with_extras(reply, frame.request_id, extras, 1),
                    deadline,
                    [theirs.fileno()],
                )
                theirs.close()
            elif reply is not None:
                conn.send_raw(encode_with_extras(reply, frame.request_id, extras), deadline)
                if isinstance(reply, p.Subscribed):
                    event = p.Event(1, "module", "another", state="running", worker_pid=1)
                    conn.send_raw(encode_with_extras(event, 0, extras), deadline)
        if worker_end is not None and worker_end in ready:
            try:
                frame = worker_end.receive(deadline)
            except p.ProtocolError as exc:
                trace.problems.append(f"a broken packet on the channel: {exc.reason}")
                frame = None
            if frame is None:
                worker_end.close()
                worker_end = None
                continue
            reply = _fake_call(frame, trace, state)
            frame.close_fds()
            worker_end.send_raw(encode_with_extras(reply, frame.request_id, extras), deadline)
    trace.problems.append("the client was still connected at the deadline")
    return worker_end


def _ready(ends: list[Endpoint], deadline: float) -> list[Endpoint]:
    poller = select.poll()
    for end in ends:
        poller.register(end.fileno(), select.POLLIN)
    fired = {fd for fd, _ in poller.poll(max(1, int(remaining(deadline) * 1000)))}
    return [end for end in ends if end.fileno() in fired]


def _fake_daemon_reply(  # noqa: PLR0911 - one answer per message type
    frame: p.Frame, trace: Trace, state: dict[str, Any]
) -> p.Message | None:
    message = frame.message
    name = message.TYPE.name
    trace.request_id("connection", frame.request_id, reply=not isinstance(message, p.Goodbye))
    if not state["hello"] and not isinstance(message, p.Hello):
        trace.problems.append(f"{name} before HELLO")
    if isinstance(message, p.Hello):
        state["hello"] = True
        trace.steps.append("HELLO")
        if p.PROTOCOL_VERSION not in message.versions:
            trace.problems.append(f"HELLO versions {message.versions} lack {p.PROTOCOL_VERSION}")
        return p.Welcome(p.PROTOCOL_VERSION, "99.0-conformance", os.getpid())
    if isinstance(message, p.Subscribe):
        state["subscribed"] = True
        trace.steps.append("SUBSCRIBE")
        return p.Subscribed(0, 0)
    if isinstance(message, p.RequestProxy):
        trace.steps.append(f"REQUEST_PROXY {message.module}")
        if not state["subscribed"]:
            trace.problems.append("REQUEST_PROXY before SUBSCRIBE")
        if message.module != "echo":
            trace.problems.append(f"REQUEST_PROXY for {message.module!r}, not 'echo'")
        methods = (p.MethodSpec("checksum"), p.MethodSpec("echo"), p.MethodSpec("init", setup=True))
        return p.ProxyGranted(1, "echo", "1.0.0", os.getpid(), methods, "valid", 1, "", 10.0)
    if isinstance(message, p.ReleaseProxy):
        trace.steps.append("RELEASE_PROXY")
        state["released"] = True
        if state["calls"] != 1 + 2 * FAKE_CALLS:
            trace.problems.append(
                f"RELEASE_PROXY after {state['calls']} calls, want {1 + 2 * FAKE_CALLS}"
            )
        return p.Released(message.proxy_id)
    if isinstance(message, p.Goodbye):
        trace.steps.append("GOODBYE")
        state["goodbye"] = True
        if not state["released"]:
            trace.problems.append("GOODBYE before RELEASE_PROXY")
        return None
    trace.steps.append(name)
    if isinstance(message, p.Status):
        return p.StatusReply({}, {})
    return p.Error("unknown_command", f"the fake daemon does not serve {name}")


def _fake_call(frame: p.Frame, trace: Trace, state: dict[str, Any]) -> p.Message:
    message = frame.message
    assert isinstance(message, p.Call)  # noqa: S101 - the channel accepts only CALL
    trace.request_id("channel", frame.request_id)
    index = state["calls"]
    state["calls"] += 1
    if index == 0:
        trace.steps.append(f"CALL {message.method}")
        if message.method != "init":
            trace.problems.append(f"the first call is {message.method!r}, not init")
        return p.Result(None)
    i, second = divmod(index - 1, 2)
    want = "checksum" if second else "echo"
    if message.method != want or i >= FAKE_CALLS:
        trace.problems.append(f"call {index} is {message.method!r}, want {want!r} of frame {i}")
    if message.method == "echo":
        trace.steps.append(f"echo {message.args.get('text')!r}")
        return p.Result({"text": message.args.get("text")})
    if message.method == "checksum":
        return _fake_checksum(frame, message, trace, i)
    if message.method == "init":
        return p.Result(None)
    return p.Error("unknown_method", f"echo has no method {message.method!r}")


def _fake_checksum(frame: p.Frame, message: p.Call, trace: Trace, i: int) -> p.Message:
    if len(frame.fds) != 1 or len(message.fd_args) != 1:
        trace.problems.append(
            f"checksum with {len(frame.fds)} fds, fd_args {list(message.fd_args)}"
        )
        return p.Error("bad_arguments", "checksum takes one buffer")
    fd = frame.fds[0]
    seals = (
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if str(Path(f"/proc/self/fd/{fd}").readlink()).startswith("/memfd:")
        else -1
    )
    if seals == -1:
        trace.problems.append(f"checksum buffer of frame {i} is not a memfd")
    elif (
        seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        or not seals & WRITE_SEALS
    ):
        trace.problems.append(
            f"checksum buffer of frame {i} has seals {seals:#x}, "
            "want F_SEAL_SHRINK | F_SEAL_GROW | a write seal"
        )
    data = read_buffer(fd)
    if data != frame_bytes(i):
        trace.problems.append(f"checksum buffer of frame {i} holds other bytes ({len(data)})")
    trace.steps.append(f"checksum ({len(data)} bytes, seals {max(seals, 0):#x})")
    return p.Result({"size": len(data), "crc32": zlib.crc32(data)})


def malformed_verdict(status: int | None, closed_after: float | None) -> tuple[bool, str]:
    """Whether a client gave up rightly after a bad magic: exited non-zero, by itself, in time."""
    if closed_after is None and status is None:
        return (
            False,
            f"neither exited nor closed the connection {MALFORMED_BOUND:g} s after a bad magic",
        )
    if status is not None and not exited_cleanly(status):
        return False, f"{describe_status(status)} after a bad magic"
    if status == 0:
        return False, "exit status 0 after a bad magic: it must fail"
    took = "" if closed_after is None else f"closed the connection after {closed_after:.2f} s, "
    if status is None:
        return False, f"{took}still running, not exited {MALFORMED_BOUND:g} s later: it hangs"
    return True, f"{took}{describe_status(status)}"


def serve_malformed(options: ClientOptions, report: Report, directory: Path) -> None:
    """Answer the client's HELLO with a packet of bad magic: it must give up promptly."""
    fake = FakeDaemon(directory)
    client, output = start_client(options, fake.path, FAKE_CALLS)
    conn: Endpoint | None = None
    try:
        deadline = time.monotonic() + min(options.timeout, FAKE_TIMEOUT)
        conn = fake.accept(deadline)
        if conn is None:
            report.add(
                "client.malformed",
                False,
                f"the client never connected ({describe_status(client.wait(time.monotonic()))})",
            )
            return
        try:
            frame = conn.receive(deadline)
        except (Timeout, p.ProtocolError) as exc:
            report.add("client.malformed", False, f"no HELLO to answer: {exc}")
            return
        if frame is None:
            report.add("client.malformed", False, "the client closed without HELLO")
            return
        frame.close_fds()
        welcome = p.encode(p.Welcome(p.PROTOCOL_VERSION, "0-bad", os.getpid()), frame.request_id)
        conn.send_raw(b"XX" + welcome[2:], deadline)
        sent = time.monotonic()
        bound = sent + MALFORMED_BOUND
        closed_at: float | None = None
        while closed_at is None and remaining(bound) > 0:
            try:
                if conn.receive_raw(bound) is None:
                    closed_at = time.monotonic()
            except Timeout:
                break
            except OSError:
                closed_at = time.monotonic()
        status = client.wait(bound if closed_at is None else time.monotonic() + MALFORMED_BOUND)
        ok, seen = malformed_verdict(status, None if closed_at is None else closed_at - sent)
        report.add("client.malformed", ok, seen + ("" if ok else output.stderr_tail()))
    finally:
        client.kill()
        output.close()
        if conn is not None:
            conn.close()
        fake.close()


@contextlib.contextmanager
def _directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ipad-conformance-") as name:
        yield Path(name)


def run_client(options: ClientOptions, report: Report) -> None:
    """Every client rule: the real daemon with kills, then the newer and the broken fake."""
    try:
        resolve(options.argv[0])
    except ValueError as exc:
        report.add("client.start", False, str(exc))
        return
    if not os.access(resolve(options.argv[0]), os.X_OK):
        report.add("client.start", False, f"{options.argv[0]!r} is not executable")
        return
    with _directory() as directory:
        run_real(options, report, directory)
        serve_fake(options, report, directory, newer=False)
        serve_fake(options, report, directory, newer=True)
        serve_malformed(options, report, directory)
