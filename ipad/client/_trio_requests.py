"""The trio client's requests on one connection: the core's RequestBook, waited for with trio.

What a frame answers is the book's decision (ipad/client/_core_requests.py);
this only sends on a PacketSocket and wakes the task waiting for a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from ipad.client._core_requests import Match, RequestBook
from ipad.protocol import wire as p
from ipad.transport.seqpacket import PacketSocket, warn_dropped

#: A request sent: its id and the event set once its reply (or the connection's end) is known.
Pending = tuple[int, trio.Event]


class TrioRequests:
    """Requests in flight on one connection (the daemon's or a proxy channel), by id."""

    def __init__(self, name: str = "") -> None:
        self.book = RequestBook(name)

    def __len__(self) -> int:
        return len(self.book)

    async def call(self, conn: PacketSocket, message: p.Message) -> p.Frame:
        """Send ``message`` and wait for its reply; the caller owns the reply's fds."""
        return await self.reply(await self.send(conn, message))

    async def send(
        self, conn: PacketSocket, message: p.Message, fds: Sequence[int] = ()
    ) -> Pending:
        """Send a request without waiting for its reply (collect it with ``reply``).

        A worker answers requests in the order they arrive, so several can be in
        flight at once (pipelined) without changing the order they run in.
        """
        answered = trio.Event()
        request_id = self.book.open(wake=answered.set).request_id
        try:
            await conn.send(message, request_id, fds)
        except BaseException:
            self.book.unsent(request_id)
            raise
        return request_id, answered

    async def reply(self, pending: Pending) -> p.Frame:
        """Wait for a sent request's reply; given up on (cancelled), its late reply is dropped."""
        request_id, answered = pending
        try:
            await answered.wait()
        except BaseException:
            self.book.give_up(request_id)
            raise
        frame = self.book.collect(request_id)  # raises the connection's end, if that came first
        assert frame is not None  # noqa: S101 - answered is set once the book has one
        return frame

    def take(self, frame: p.Frame) -> Match:
        """What ``frame`` is (a reply wakes its caller); strays are logged, rate-limited."""
        match = self.book.take(frame)
        if match is Match.UNKNOWN:
            warn_dropped(self.book.name, frame)
        return match

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """The connection ended: waiting callers, and later ones, fail with ``error()``."""
        self.book.fail_all(error)
