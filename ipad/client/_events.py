"""Events as the trio client hands them to the application: a queue that never blocks."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ipad.client._backlog import EVENT_BACKLOG, EVENT_BACKLOG_BYTES, Backlog

__all__ = ["EVENT_BACKLOG", "EVENT_BACKLOG_BYTES", "EventQueue", "LocalEvent"]


class EventQueue:
    """A queue bounded in count and bytes that never blocks its writer: the oldest entry goes.

    ``dropped`` counts the events lost (ipad/client/_backlog.py says how).
    """

    def __init__(self, size: int = EVENT_BACKLOG, max_bytes: int = EVENT_BACKLOG_BYTES) -> None:
        self._items = Backlog(size, max_bytes)
        self._ready = trio.Event()
        self._closed = False

    @property
    def dropped(self) -> int:
        """Events lost: dropped when the queue was full, or undecodable when read."""
        return self._items.dropped

    def put(self, item: object) -> None:
        """Add an item, dropping the oldest if the queue is full."""
        self._items.put(item)
        self._ready.set()

    def close(self) -> None:
        """No more items will come; readers finish once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def get(self) -> Any:
        """The next item; raise trio.EndOfChannel once closed and drained."""
        while True:
            while not self._items:
                if self._closed:
                    raise trio.EndOfChannel
                self._ready = trio.Event()
                await self._ready.wait()
            item = self._items.pop()
            if item is not None:  # None: a module event that could not be decoded (lost)
                return item

    def __aiter__(self) -> EventQueue:
        # An iterator object, not an async generator: breaking out of ``async for``
        # then leaves no generator to be finalised behind trio's back.
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@attrs.frozen
class LocalEvent:
    """An event the client library makes itself, read from ``Client.events`` with the daemon's.

    Kinds: ``recovered`` and ``fallback`` (a proxy is valid again, on its
    module or on the fallback serving it), ``recovery_failed``, and with
    ``reconnect=True`` ``disconnected`` and ``reconnected`` (about the daemon
    connection: ``module`` is "" and ``proxy_id`` None).
    """

    kind: str
    module: str
    proxy_id: int | None
    details: dict[str, Any] = attrs.field(factory=dict)
    #: As on daemon events, so one loop can read both.
    state: str | None = None
    reason: str | None = None
