"""What a client keeps of the events nobody has read yet: bounded in count and in bytes.

Both clients keep events that arrive before the application reads them. A
module event is kept as it came, undecoded (its data a ``msgspec.Raw``), and
decoded only when it is read: 200 KB of msgpack can decode to 14 MB of Python
objects, so what is stored is bounded by the bytes that arrived, not by what
a module made them decode to. A backlog holds at most EVENT_BACKLOG events and
EVENT_BACKLOG_BYTES bytes; past either, the oldest are dropped and counted in
``dropped`` (the "events lost" count each client exposes). An event that
cannot be decoded when read (the client is out of memory, absurd nesting) is
counted the same way and skipped.

Sans I/O and without trio, for the blocking client as for the trio one.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import msgspec

from ipad.protocol import wire as p

#: Events kept for a reader that is behind; older ones are dropped first.
EVENT_BACKLOG = 1024
#: Bytes of events kept for a reader that is behind (its data as it arrived, its name as held, plus
#: EVENT_OVERHEAD); older ones are dropped first. Four full-size module events.
EVENT_BACKLOG_BYTES = 4 * p.MAX_PAYLOAD
#: What one kept event costs besides its bytes: its objects and the queue's slot.
EVENT_OVERHEAD = 256


class RawModuleEvent(p.Message, frozen=True):
    """A MODULE_EVENT as received: its data still msgpack, decoded when the event is read."""

    TYPE = p.MsgType.MODULE_EVENT
    name: str
    data: msgspec.Raw = msgspec.Raw(b"\xc0")  # nil, as ModuleEvent's default None encodes

    def decoded(self) -> p.ModuleEvent:
        """The event as the application reads it."""
        return p.ModuleEvent(self.name, msgspec.msgpack.decode(self.data))


#: The decoders a client's channel uses (``p.decode(decoders=...)``): module events stay raw.
RAW_EVENTS: dict[p.MsgType, msgspec.msgpack.Decoder[Any]] = {
    p.MsgType.MODULE_EVENT: msgspec.msgpack.Decoder(RawModuleEvent)
}


def event_cost(item: object) -> int:
    """What keeping ``item`` costs against EVENT_BACKLOG_BYTES."""
    if isinstance(item, RawModuleEvent):
        # The name as it is held: len() counts characters, and one can take 4 bytes.
        return EVENT_OVERHEAD + sys.getsizeof(item.name) + len(item.data)
    if isinstance(item, p.Event):
        # The daemon's events are small and their strings capped: their encoded size is a
        # fair measure, and encoding one takes about a microsecond.
        return EVENT_OVERHEAD + len(msgspec.msgpack.encode(item))
    return EVENT_OVERHEAD


class Backlog:
    """A FIFO of events bounded in count and bytes; when full, the oldest go (and are counted)."""

    def __init__(self, size: int = EVENT_BACKLOG, max_bytes: int = EVENT_BACKLOG_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._items: collections.deque[tuple[object, int]] = collections.deque()
        #: Bytes of the events kept now, as event_cost counts them.
        self.bytes = 0
        #: Events lost: dropped to make room, or undecodable when read.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: object) -> None:
        """Keep ``item``; drop the oldest until both bounds hold (never ``item`` itself)."""
        cost = event_cost(item)
        while self._items and (len(self._items) >= self.size or self.bytes + cost > self.max_bytes):
            _, old_cost = self._items.popleft()
            self.bytes -= old_cost
            self.dropped += 1
        self._items.append((item, cost))
        self.bytes += cost

    def pop(self) -> Any:
        """The oldest event, decoded; None if it could not be (counted lost); IndexError if none."""
        item, cost = self._items.popleft()
        self.bytes -= cost
        if not isinstance(item, RawModuleEvent):
            return item
        try:
            return item.decoded()
        except (MemoryError, RecursionError, ValueError):
            self.dropped += 1
            return None
