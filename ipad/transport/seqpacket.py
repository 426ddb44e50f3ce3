"""Packets and requests over SEQPACKET sockets, for trio code.

``PacketSocket`` sends and receives whole protocol messages with their fds;
``Requests`` matches replies to the calls waiting for them by request id. A
reply whose caller was cancelled or timed out is dropped and logged, never
handed to another caller, and request ids are never reused on a connection.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
import structlog
import trio

from ipad.protocol import wire as p
from ipad.protocol.fdpass import receive_into_buffer, rights, unpack_received
from ipad.protocol.rate_limit import RateLimit

log = structlog.get_logger("ipad")

#: ``reply.dropped`` warnings per process: DROPPED_BURST per DROPPED_INTERVAL, the rest counted.
DROPPED_BURST = 10
DROPPED_INTERVAL = 10.0
DROPPED_WARNINGS = RateLimit(DROPPED_INTERVAL, DROPPED_BURST)


def warn_dropped(connection: str, frame: p.Frame) -> None:
    """Log a reply nobody waits for, within the process's rate limit.

    A peer can send replies to ids never used as fast as it likes: a warning for
    each would be its to multiply. The count of those not logged comes with the next.
    """
    logged, suppressed = DROPPED_WARNINGS.allow(time.monotonic())
    if logged:
        log.warning("reply.dropped", connection=connection, request_id=frame.request_id,
                    message=frame.message.TYPE.name,
                    **({"suppressed": suppressed} if suppressed else {}))  # fmt: skip


def report_suppressed_drops() -> None:
    """Log how many ``reply.dropped`` warnings were suppressed and not reported yet."""
    count = DROPPED_WARNINGS.flush()
    if count:
        log.warning("reply.dropped_suppressed", count=count, interval=DROPPED_INTERVAL)


class PacketSocket:
    """A SEQPACKET socket that carries protocol messages; sends are serialised.

    A send goes straight to the kernel when no other send is waiting, without
    yielding to the scheduler: on a crash the daemon sends several events and
    a reply in a row, and a scheduler pass between each would add up to a
    good part of a millisecond. Only a full socket buffer makes a send wait,
    in FIFO order behind the lock, so messages never overtake each other.
    """

    # Slots: one per worker, standby and client connection.
    __slots__ = ("_send_lock", "_sock", "allowed", "decoders", "max_payload", "raw")

    def __init__(
        self,
        sock: socket.socket,
        allowed: frozenset[p.MsgType],
        max_payload: int = p.MAX_PAYLOAD,
        decoders: Mapping[p.MsgType, msgspec.msgpack.Decoder[Any]] | None = None,
    ) -> None:
        #: The socket itself, non-blocking: sends try it first, without a scheduler pass.
        self.raw = sock
        sock.setblocking(False)
        self.allowed = allowed
        #: The largest payload received; a bigger packet does not fit the buffer (MSG_TRUNC).
        self.max_payload = max_payload
        #: Decoders replacing the protocol's for some types (p.decode's ``decoders``).
        self.decoders = decoders
        # Made on first need: most sockets never wait for room (and a daemon holds hundreds).
        self._sock: trio.socket.SocketType | None = None
        self._send_lock: trio.StrictFIFOLock | None = None

    @property
    def sock(self) -> trio.socket.SocketType:
        """The socket as trio's, for a send that must wait for room."""
        if self._sock is None:
            self._sock = trio.socket.from_stdlib_socket(self.raw)
        return self._sock

    async def send(self, message: p.Message, request_id: int = 0, fds: Sequence[int] = ()) -> None:
        """Send one message; ``fds`` stay open on this side."""
        packet = p.encode(message, request_id, len(fds))
        if self._send_lock is None or not self._send_lock.locked():
            try:
                self.raw.sendmsg([packet], rights(fds))
            except BlockingIOError:
                pass  # the buffer is full: wait for room like everyone else
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the socket was closed") from None
                raise
            else:
                return
        if self._send_lock is None:
            self._send_lock = trio.StrictFIFOLock()
        async with self._send_lock:
            await self.sock.sendmsg([packet], rights(fds))

    def send_nowait(self, message: p.Message, request_id: int = 0) -> bool:
        """Send one message if the socket has room now; False, nothing sent, if not (or closed).

        For what the daemon tells a worker in passing (CLOSE_INSTANCE): a peer
        that does not read its socket must not hold up the client it serves.
        """
        if self._send_lock is not None and self._send_lock.locked():
            return False  # a send waits for room: this one must not overtake it
        try:
            self.raw.sendmsg([p.encode(message, request_id)])
        except OSError:
            return False
        return True

    async def receive(self) -> p.Frame | None:
        """The next message, or None at end of stream; ProtocolError if the peer broke the rules.

        The packet lands in the thread's one receive buffer (ipad/protocol/fdpass.py)
        and is copied out before anything can yield, so tasks receiving on
        other sockets never see it overwritten; like trio's own receive, it is
        a checkpoint.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                frame = self.receive_nowait()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)
                waited = True
                continue
            break
        if not waited:  # as trio's own sockets do: a receive that did not wait still yields
            await trio.lowlevel.cancel_shielded_checkpoint()
        return frame

    def receive_nowait(self) -> p.Frame | None:
        """The next message if one is there (BlockingIOError if not); None at end of stream.

        For a reader called back when the socket is readable (ipad/daemon/reactor.py).
        """
        max_packet = p.HEADER_SIZE + self.max_payload
        try:
            data, ancdata, msg_flags = receive_into_buffer(self.raw, max_packet)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("the socket was closed") from None
            raise
        received = unpack_received(data, ancdata, msg_flags, max_packet)
        if received is None:
            return None
        return p.decode(
            *received, allowed=self.allowed, max_payload=self.max_payload, decoders=self.decoders
        )

    def discard_unread(self, limit: int) -> None:
        """Drop up to ``limit`` packets the peer sent that nobody will read (their fds too).

        Closing a socket with unread packets makes the kernel report ECONNRESET to
        the peer before what was sent to it, so a GOODBYE's reason would reach it
        only if it reads on past the error. Without a control buffer the kernel
        closes any passed descriptors itself.
        """
        for _ in range(limit):
            try:
                if not self.raw.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC):
                    return
            except OSError:
                return

    def close(self) -> None:
        """Close the socket (a blocked receive or send wakes with an error)."""
        if self._sock is not None:
            self._sock.close()
            return
        if self.raw.fileno() != -1:
            with contextlib.suppress(RuntimeError):  # outside trio nobody can be waiting
                trio.lowlevel.notify_closing(self.raw)
        self.raw.close()


class _Ids(Iterator[int]):
    """Request ids, 1, 2, 3...; remembers the last one handed out (``Requests.last_id``)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def __next__(self) -> int:
        self.last += 1
        return self.last


class _Slot:
    __slots__ = ("done", "error", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: p.Frame | None = None
        self.error: Callable[[], Exception] | None = None


#: A request ``Requests.send`` has sent: its id and the slot its reply will land in.
Pending = tuple[int, _Slot]


class Requests:
    """Requests in flight on one connection, by id."""

    __slots__ = ("_closed", "_ids", "_pending", "name", "on_dropped")

    def __init__(self, name: str = "") -> None:
        self.name = name
        #: Told of every reply nobody takes (late, or its caller cancelled), before it is dropped.
        self.on_dropped: Callable[[p.Frame], None] | None = None
        self._ids = _Ids()
        self._pending: dict[int, _Slot] = {}
        self._closed: Callable[[], Exception] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def last_id(self) -> int:
        """The highest request id used: a reply to a higher one answers nothing ever asked."""
        return self._ids.last

    def __contains__(self, request_id: int) -> bool:
        """Whether a caller waits for the reply to ``request_id``."""
        return request_id in self._pending

    async def call(
        self, conn: PacketSocket, message: p.Message, fds: Sequence[int] = ()
    ) -> p.Frame:
        """Send ``message`` and wait for its reply; the caller owns the reply's fds."""
        request_id, slot = await self.send(conn, message, fds)
        return await self.reply(request_id, slot)

    async def send(
        self, conn: PacketSocket, message: p.Message, fds: Sequence[int] = ()
    ) -> Pending:
        """Send a request without waiting for its reply (collect it with ``reply``).

        A worker answers requests in the order they arrive, so several can be in
        flight at once (pipelined) without changing the order they run in.
        """
        if self._closed is not None:
            raise self._closed()
        request_id = next(self._ids)
        slot = _Slot()
        self._pending[request_id] = slot
        try:
            await conn.send(message, request_id, fds)
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return request_id, slot

    def send_nowait(self, conn: PacketSocket, message: p.Message) -> Pending | None:
        """Send a request if ``conn`` has room now (see ``PacketSocket.send_nowait``); else None.

        For what must never wait on a peer that does not read (the heartbeat's PING).
        """
        if self._closed is not None:
            raise self._closed()
        request_id = next(self._ids)
        if not conn.send_nowait(message, request_id):
            return None
        slot = self._pending[request_id] = _Slot()
        return request_id, slot

    async def reply(self, request_id: int, slot: _Slot) -> p.Frame:
        """Wait for the reply to a request ``send`` made."""
        try:
            await slot.done.wait()
        except BaseException:
            # Cancelled or failed: forget the id, so a late reply is dropped, not misdelivered;
            # a reply that was delivered in the same instant is dropped here, fds and all.
            self._pending.pop(request_id, None)
            if slot.frame is not None:
                self._drop(slot.frame)
            raise
        if slot.error is not None:
            raise slot.error()
        assert slot.frame is not None  # noqa: S101 - set together with done
        return slot.frame

    def forget(self, pending: Pending) -> None:
        """Stop waiting for a request's reply: when it comes, it is dropped like a late one."""
        self._pending.pop(pending[0], None)

    def deliver(self, frame: p.Frame) -> bool:
        """Hand a reply to its caller; a reply nobody waits for is logged and its fds closed."""
        slot = self._pending.pop(frame.request_id, None)
        if slot is None:
            self._drop(frame)
            return False
        slot.frame = frame
        slot.done.set()
        return True

    def _drop(self, frame: p.Frame) -> None:
        if self.on_dropped is not None:
            self.on_dropped(frame)
        frame.close_fds()
        warn_dropped(self.name, frame)

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """The connection is gone: every caller fails at once, and so does every later call.

        ``error`` makes each caller its own exception, so tracebacks do not pile up on one.
        """
        self._closed = error
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.error = error
            slot.done.set()
