"""The event bus: every state change numbered, logged and sent to each subscriber.

A subscriber has a bounded queue. One that stops reading is cut off (its
queue is closed and its session ends it) instead of making the daemon buffer
without bound or wait on it while other clients starve.
"""

from __future__ import annotations

import collections
import itertools
import math
from typing import Any

import structlog
import trio

from . import _protocol as p

log = structlog.get_logger("ipad")

#: Events a subscriber may have unread before it is disconnected.
DEFAULT_QUEUE = 1024

#: Past events kept for subscribers that ask for history (``ipadctl events``, reconnects).
HISTORY = 256

#: The log record's event name for each kind of bus event.
_LOG_EVENTS = {"proxy": "proxy.state_changed", "module": "module.state_changed"}


class Subscription:
    """One subscriber's queue; ``overflowed`` tells why it was closed."""

    def __init__(self, size: int) -> None:
        self.send, self.receive = trio.open_memory_channel[p.Event](size)
        self.overflowed = False


class EventBus:
    """Numbers events with a monotonic sequence and fans them out."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.last_seq = 0
        self._subscribers: set[Subscription] = set()
        self.history: collections.deque[p.Event] = collections.deque(maxlen=HISTORY)

    def since(self, seq: int) -> list[p.Event]:
        """The kept events after ``seq``, oldest first."""
        return [event for event in self.history if event.seq > seq]

    def subscribe(self, size: int = DEFAULT_QUEUE) -> Subscription:
        """A new subscriber; it receives every event published from now on."""
        sub = Subscription(size if size > 0 else math.inf)  # type: ignore[arg-type]
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop sending to ``sub`` and close its queue."""
        self._subscribers.discard(sub)
        sub.send.close()

    def publish(
        self,
        kind: str,
        module: str,
        *,
        proxy_id: int | None = None,
        state: str | None = None,
        reason: str | None = None,
        worker_pid: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> p.Event:
        """Number, log and fan out one event."""
        self.last_seq = next(self._seq)
        event = p.Event(
            seq=self.last_seq,
            kind=kind,
            module=module,
            proxy_id=proxy_id,
            state=state,
            reason=reason,
            worker_pid=worker_pid,
            details=details or {},
        )
        fields = {"proxy_id": proxy_id, "state": state, "reason": reason, "worker_pid": worker_pid}
        log.info(
            _LOG_EVENTS.get(kind, "event.published"),
            seq=event.seq,
            module=module,
            **{k: v for k, v in fields.items() if v is not None},
            **(details or {}),
        )
        self.history.append(event)
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.overflowed = True
                self.unsubscribe(sub)
                log.warning(
                    "events.subscriber_overflow", queue=sub.send.statistics().max_buffer_size
                )
            except trio.BrokenResourceError:
                self.unsubscribe(sub)
        return event
