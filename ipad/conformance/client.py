"""Client mode: run a client program against a real ipad daemon, then against a fake one.

Real daemon: a private daemon (its own socket, a temporary configuration
enabling the shipped ``echo`` module) serves the client, and the kit kills the
echo worker several times while the client runs; the client must recover and
print every line (the contract: docs/conformance.md). Fake daemon: the kit
itself answers, as this version (checking every step of the contract, a
crash of its worker included: ipad/conformance/fake.py), as a newer minor
(unknown fields everywhere), and with a broken packet, which the client must
refuse promptly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ipad.conformance.contract import check_lines
from ipad.conformance.fake import FakeDaemon, FakeSession
from ipad.conformance.peer import (
    Endpoint,
    Timeout,
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
from ipad.protocol.fdpass import size_send_buffer

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


class Output:
    """A client's stdout read line by line as it comes; its stderr kept in a file.

    Its stdout is a stream socket whose send buffer is the smallest the kernel
    allows, not a pipe: a client can then be only a line or two ahead of what
    the kit has read (a pipe would let it print 64 KiB, every line of a fast
    run, before the kit is scheduled), so a kill due after line k lands
    while the client still has calls to make, however loaded the machine.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # raised to the minimum
        ours.shutdown(socket.SHUT_WR)
        ours.setblocking(False)
        self.read_end, self.write_end = ours.detach(), theirs.detach()
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
        """Close our ends of its stdout and the stderr file (once: numbers are reused)."""
        for fd in (self.read_end, self.write_end):
            if fd >= 0:
                os.close(fd)
        self.read_end = self.write_end = -1
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
    os.close(output.write_end)  # the client's copy is its own now
    output.write_end = -1
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
    problems = []
    for pid, invalid in landed:
        if invalid is None:
            problems.append(f"the daemon published no invalid proxy after worker {pid} was killed")
            continue
        # On a loaded machine the event can still be on its way: wait for it, within a bound.
        monitor.wait_event(
            lambda e, after=invalid: (
                e.kind == "proxy"
                and e.proxy_id == after.proxy_id  # type: ignore[misc]
                and e.seq > after.seq
                and e.state == "valid"
            ),
            DAEMON_REPLY,
        )
        valid = [
            e
            for e in monitor.events
            if e.kind == "proxy"
            and e.proxy_id == invalid.proxy_id
            and e.seq > invalid.seq
            and e.state == "valid"
        ]
        if not valid:
            seen = [
                f"{e.seq}:{e.state}({e.reason}, pid {e.worker_pid})"
                for e in monitor.events
                if e.kind == "proxy" and e.proxy_id == invalid.proxy_id
            ]
            problems.append(
                f"proxy {invalid.proxy_id} never became valid again after worker {pid} died "
                f"(no REOPEN_PROXY + PROXY_READY); its events: {', '.join(seen[-12:])}"
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


def serve_fake(options: ClientOptions, report: Report, directory: Path, *, newer: bool) -> None:
    """Be the daemon (and the echo worker) for a short run, as this version or a newer minor.

    As this version: every step of the contract is checked in order, a crash and
    the recovery included (``client.contract``). As a newer minor: every message
    carries fields this version does not know, which the client must ignore
    (``client.newer_peer``).
    """
    extras = EXTRAS if newer else {}
    fake = FakeDaemon(directory)
    client, output = start_client(options, fake.path, FAKE_CALLS)
    conn: Endpoint | None = None
    try:
        deadline = time.monotonic() + min(options.timeout, FAKE_TIMEOUT)
        conn = fake.accept(deadline)
        if conn is None:
            problems, steps = ["the client never connected"], []
        else:
            session = FakeSession(
                conn, FAKE_CALLS, extras, deadline, (output.read_end, output.pump)
            )
            session.run()
            problems, steps = session.trace.problems, session.trace.steps
        status = client.wait(deadline)
        output.pump()
        ok_lines, lines_seen = check_lines(output.lines, FAKE_CALLS)
        ok = status == 0 and ok_lines and not problems
        seen = f"{describe_status(status)}; {lines_seen}"
        if newer:
            seen = f"every message with unknown fields ({', '.join(sorted(extras))}): {seen}"
        if problems:
            seen += "; " + "; ".join(problems)
        elif not newer:
            seen += "; " + " → ".join(steps)
        report.add(
            "client.newer_peer" if newer else "client.contract",
            ok,
            seen + ("" if ok else output.stderr_tail()),
        )
    finally:
        client.kill()
        output.close()
        if conn is not None:
            conn.close()
        fake.close()


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
