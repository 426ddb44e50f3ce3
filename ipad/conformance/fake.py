"""A fake daemon, and the echo worker behind it, that checks each step of the client contract.

The kit answers the client itself: HELLO, SUBSCRIBE, REQUEST_PROXY, then the
calls on the channel it granted. On the echo of frame ``CRASH_FRAME`` its
"worker" dies once (the channel is closed unanswered and an ``invalid`` EVENT
follows), so the client must REOPEN_PROXY, replay ``init`` first on the new
channel, send PROXY_READY and make the call again. With ``extras`` every
message it sends carries fields this version does not know (a newer minor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import select
import socket
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipad.conformance.contract import frame_bytes, frame_text
from ipad.conformance.peer import (
    WRITE_SEALS,
    Endpoint,
    encode_with_extras,
    read_buffer,
    remaining,
    wait_fd,
)
from ipad.protocol import wire as p
from ipad.protocol.fdpass import size_send_buffer, sized_socketpair

#: The frame whose echo the fake worker dies on, once.
CRASH_FRAME = 1
#: Steps kept for the report: a client may send without end.
MAX_STEPS = 64
#: The pids the fake names as its workers' (before and after the crash).
WORKER_PIDS = (4_000_001, 4_000_002)
#: The methods the fake's echo module announces.
METHODS = (p.MethodSpec("checksum"), p.MethodSpec("echo"), p.MethodSpec("init", setup=True))


class FakeDaemon:
    """A listening socket the kit answers on itself."""

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

    def step(self, text: str) -> None:
        """One more thing the client did (the first MAX_STEPS are kept)."""
        if len(self.steps) < MAX_STEPS:
            self.steps.append(text)

    def problem(self, text: str) -> None:
        """A broken rule of the contract (the first few are kept)."""
        if len(self.problems) < MAX_STEPS // 4:
            self.problems.append(text)

    def request_id(self, where: str, request_id: int, *, reply: bool = True) -> None:
        """A request id must be new on its connection, and not 0 for a request."""
        if reply and request_id == 0:
            self.problem(f"a request with id 0 on the {where}")
        if (where, request_id) in self.ids and request_id:
            self.problem(f"request id {request_id} used twice on the {where}")
        if len(self.ids) < 10_000:
            self.ids.add((where, request_id))


class FakeSession:
    """One client's connection to the fake daemon, and the channels it grants."""

    def __init__(
        self,
        conn: Endpoint,
        calls: int,
        extras: dict[str, Any],
        deadline: float,
        output: tuple[int, Callable[[], None]] | None = None,
    ) -> None:
        self.conn = conn
        #: The client's stdout and what takes its lines: read as they come, or it blocks.
        self.output = output
        self.calls = calls
        self.extras = extras
        self.deadline = deadline
        self.trace = Trace()
        self.channel: Endpoint | None = None
        #: The channel's generation: 0 until the crash, 1 after the reopen.
        self.generation = 0
        #: Calls seen on the current channel.
        self.on_channel = 0
        #: The calls answered other than init, as "echo 0", "checksum 0", …
        self.answered: list[str] = []
        self.seq = 1
        self.said = {"hello": False, "subscribed": False, "released": False, "goodbye": False}
        self.crashed = False
        self.reopened = False
        self.replayed: int | None = None

    def send(self, message: p.Message, request_id: int, fds: tuple[int, ...] = ()) -> None:
        """Send to the client's connection, with the extra fields of a newer peer."""
        packet = encode_with_extras(message, request_id, self.extras, len(fds))
        self.conn.send_raw(packet, self.deadline, fds)

    def run(self) -> None:
        """Answer until the client leaves (or the deadline), then judge what it did."""
        try:
            while remaining(self.deadline) > 0:
                ends = [self.conn] + ([self.channel] if self.channel is not None else [])
                poller = select.poll()
                for end in ends:
                    poller.register(end.fileno(), select.POLLIN)
                if self.output is not None:
                    poller.register(self.output[0], select.POLLIN)
                fired = {fd for fd, _ in poller.poll(max(1, int(remaining(self.deadline) * 1000)))}
                if self.output is not None and self.output[0] in fired:
                    self.output[1]()
                if self.conn.fileno() in fired and not self._from_client():
                    self._judge()
                    return
                if self.channel is not None and self.channel.fileno() in fired:
                    try:
                        self._from_channel()
                    except OSError as exc:  # its connection ended as the fake told it something
                        self.trace.problem(f"the client left ({exc.strerror})")
                        self._judge()
                        return
            self.trace.problem("the client was still connected at the deadline")
        finally:
            if self.channel is not None:
                self.channel.close()

    def _from_client(self) -> bool:
        """Answer one message; False once the connection ended."""
        try:
            frame = self.conn.receive(self.deadline)
        except p.ProtocolError as exc:
            self.trace.problem(f"a broken packet to the daemon: {exc.reason}")
            return False
        if frame is None:
            return False
        frame.close_fds()
        try:
            self._answer(frame)
        except OSError as exc:  # EPIPE, ECONNRESET: it left while the daemon answered
            self.trace.problem(f"the client left with a request unanswered ({exc.strerror})")
            return False
        return True

    def _judge(self) -> None:
        said, trace = self.said, self.trace
        if not said["released"]:
            trace.problem("the connection ended without RELEASE_PROXY")
        elif not said["goodbye"]:
            trace.problem("the connection ended without GOODBYE")
        want = [f"{m} {i}" for i in range(self.calls) for m in ("echo", "checksum")]
        if said["released"] and self.answered != want:
            trace.problem(
                f"the calls answered were {self.answered[:8]}…, want echo and checksum "
                f"of each frame in order"
            )
        if self.crashed and not self.reopened:
            trace.problem("the channel ended under a call, and no REOPEN_PROXY came")
        if self.reopened and self.replayed is None:
            trace.problem("no PROXY_READY after REOPEN_PROXY")
        elif self.reopened and self.replayed is not None and self.replayed < 1:
            trace.problem(f"PROXY_READY said replayed: {self.replayed} after replaying init")

    def _answer(self, frame: p.Frame) -> None:  # noqa: PLR0912 - one branch per message type
        message, trace, said = frame.message, self.trace, self.said
        name = message.TYPE.name
        trace.request_id("connection", frame.request_id, reply=not isinstance(message, p.Goodbye))
        if not said["hello"] and not isinstance(message, p.Hello):
            trace.problem(f"{name} before HELLO")
        if isinstance(message, p.Hello):
            said["hello"] = True
            trace.step("HELLO")
            if p.PROTOCOL_VERSION not in message.versions:
                trace.problem(f"HELLO versions {message.versions} lack {p.PROTOCOL_VERSION}")
            self.send(
                p.Welcome(p.PROTOCOL_VERSION, "99.0-conformance", os.getpid()), frame.request_id
            )
        elif isinstance(message, p.Subscribe):
            said["subscribed"] = True
            trace.step("SUBSCRIBE")
            self.send(p.Subscribed(self.seq, 0), frame.request_id)
            self.seq += 1
            self.send(p.Event(self.seq, "module", "another", state="running", worker_pid=1), 0)
        elif isinstance(message, p.RequestProxy):
            trace.step(f"REQUEST_PROXY {message.module}")
            if not said["subscribed"]:
                trace.problem("REQUEST_PROXY before SUBSCRIBE")
            if message.module != "echo":
                trace.problem(f"REQUEST_PROXY for {message.module!r}, not 'echo'")
            self._grant(frame.request_id, "valid")
        elif isinstance(message, p.ReopenProxy | p.ProxyReady):
            self._recovery(frame, message)
        elif isinstance(message, p.ReleaseProxy):
            trace.step("RELEASE_PROXY")
            said["released"] = True
            self.send(p.Released(message.proxy_id), frame.request_id)
        elif isinstance(message, p.Goodbye):
            trace.step("GOODBYE")
            said["goodbye"] = True
            if not said["released"]:
                trace.problem("GOODBYE before RELEASE_PROXY")
        elif isinstance(message, p.Status):
            trace.step(name)
            self.send(p.StatusReply({}, {}), frame.request_id)
        else:
            trace.step(name)
            self.send(
                p.Error("unknown_command", f"the fake daemon does not serve {name}"),
                frame.request_id,
            )

    def _recovery(self, frame: p.Frame, message: p.ReopenProxy | p.ProxyReady) -> None:
        trace = self.trace
        if isinstance(message, p.ReopenProxy):
            trace.step("REOPEN_PROXY")
            if message.proxy_id != 1:
                error = p.Error("unknown_proxy", f"no proxy {message.proxy_id}")
                self.send(error, frame.request_id)
                trace.problem(f"REOPEN_PROXY for proxy {message.proxy_id}, which it never held")
                return
            if not self.crashed:
                trace.problem("REOPEN_PROXY while the proxy was valid")
            self.reopened = True
            self.generation += 1
            self.on_channel = 0
            self._grant(frame.request_id, "invalid")
            return
        trace.step(f"PROXY_READY replayed={message.replayed}")
        self.replayed = message.replayed
        if not self.reopened:
            trace.problem("PROXY_READY without a REOPEN_PROXY")
        self.seq += 1
        details = {"replayed": message.replayed}
        pid = WORKER_PIDS[1]
        self.send(p.Event(self.seq, "proxy", "echo", 1, "valid", "recovered", pid, details), 0)
        self.send(p.ProxyStateReply(1, "valid", self.seq), frame.request_id)

    def _grant(self, request_id: int, state: str) -> None:
        if self.channel is not None:
            self.channel.close()
        ours, theirs = sized_socketpair()
        self.channel = Endpoint(ours, p.TO_WORKER_CHANNEL, f"channel {self.generation}")
        pid = WORKER_PIDS[min(self.generation, 1)]
        grant = p.ProxyGranted(1, "echo", "1.0.0", pid, METHODS, state, self.seq, "", 10.0)
        try:
            self.send(grant, request_id, (theirs.fileno(),))
        finally:
            theirs.close()

    def _from_channel(self) -> None:
        assert self.channel is not None  # noqa: S101 - called only with a channel
        try:
            frame = self.channel.receive(self.deadline)
        except p.ProtocolError as exc:
            self.trace.problem(f"a broken packet on the channel: {exc.reason}")
            frame = None
        if frame is None:
            self.channel.close()
            self.channel = None
            return
        try:
            reply = self._call(frame)
        finally:
            frame.close_fds()
        if reply is not None and self.channel is not None:
            packet = encode_with_extras(reply, frame.request_id, self.extras)
            try:
                self.channel.send_raw(packet, self.deadline)
            except OSError:  # it closed the channel with its call in flight: its end
                self.channel.close()
                self.channel = None

    def _call(self, frame: p.Frame) -> p.Message | None:
        message = frame.message
        assert isinstance(message, p.Call)  # noqa: S101 - the channel accepts only CALL
        trace = self.trace
        trace.request_id(f"channel {self.generation}", frame.request_id)
        first = self.on_channel == 0
        self.on_channel += 1
        if first and message.method != "init":
            trace.problem(
                f"the first call on channel {self.generation} is {message.method!r}, not init"
            )
        if message.method == "init":
            trace.step(f"init (channel {self.generation})")
            return p.Result(None)
        if message.method == "echo":
            text = message.args.get("text")
            i = len(self.answered) // 2
            if text != frame_text(i):
                trace.problem(f"echo {text!r}, want {frame_text(i)!r}")
            if i == CRASH_FRAME and not self.crashed:
                self._crash()
                return None
            trace.step(f"echo {text!r}")
            self.answered.append(f"echo {i}")
            return p.Result({"text": text})
        if message.method == "checksum":
            return self._checksum(frame, message)
        return p.Error("unknown_method", f"echo has no method {message.method!r}")

    def _crash(self) -> None:
        """The fake worker dies under the call: its channel ends, an invalid EVENT follows."""
        self.crashed = True
        self.trace.step("(the worker dies)")
        assert self.channel is not None  # noqa: S101 - a call just came on it
        self.channel.close()
        self.channel = None
        self.seq += 1
        reason = "worker exited with signal SIGKILL (the conformance kit's fake)"
        self.send(p.Event(self.seq, "proxy", "echo", 1, "invalid", reason, WORKER_PIDS[0]), 0)

    def _checksum(self, frame: p.Frame, message: p.Call) -> p.Message:
        trace = self.trace
        i = len(self.answered) // 2
        if len(frame.fds) != 1 or len(message.fd_args) != 1:
            trace.problem(f"checksum with {len(frame.fds)} fds, fd_args {list(message.fd_args)}")
            return p.Error("bad_arguments", "checksum takes one buffer")
        fd = frame.fds[0]
        memfd = str(Path(f"/proc/self/fd/{fd}").readlink()).startswith("/memfd:")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if memfd else -1
        resize = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        if seals == -1:
            trace.problem(f"checksum buffer of frame {i} is not a memfd")
        elif seals & resize != resize or not seals & WRITE_SEALS:
            trace.problem(
                f"checksum buffer of frame {i} has seals {seals:#x}, "
                "want F_SEAL_SHRINK | F_SEAL_GROW | a write seal"
            )
        data = read_buffer(fd)
        if data != frame_bytes(i):
            trace.problem(f"checksum buffer of frame {i} holds other bytes ({len(data)})")
        trace.step(f"checksum ({len(data)} bytes, seals {max(seals, 0):#x})")
        self.answered.append(f"checksum {i}")
        return p.Result({"size": len(data), "crc32": zlib.crc32(data)})
