"""Events as the trio client hands them to the application: a queue that never blocks."""

from __future__ import annotations

import collections
from typing import Any

import attrs
import trio

#: Events kept for a reader that is behind; older ones are dropped first.
EVENT_BACKLOG = 1024


class EventQueue:
    """A bounded queue that never blocks its writer: when full, the oldest entry goes."""

    def __init__(self, size: int = EVENT_BACKLOG) -> None:
        self._items: collections.deque[Any] = collections.deque(maxlen=size)
        self._ready = trio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: object) -> None:
        """Add an item, dropping the oldest if the queue is full."""
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """No more items will come; readers finish once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def get(self) -> Any:
        """The next item; raise trio.EndOfChannel once closed and drained."""
        while not self._items:
            if self._closed:
                raise trio.EndOfChannel
            self._ready = trio.Event()
            await self._ready.wait()
        return self._items.popleft()

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
