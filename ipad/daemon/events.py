"""The event bus: every state change numbered, logged and sent to each subscriber.

A subscriber has a bounded queue. One that stops reading is cut off (its
queue is closed and its session ends it) instead of making the daemon buffer
without bound or wait on it while other clients starve.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from typing import Any

import structlog
import trio

from ipad.protocol import wire as p

log = structlog.get_logger("ipad")

#: Events a subscriber may have unread before it is disconnected.
DEFAULT_QUEUE = 1024

#: Past events kept for subscribers that ask for history (``ipadctl events``, reconnects).
HISTORY = 256

#: The log record's event name for each kind of bus event.
_LOG_EVENTS = {"proxy": "proxy.state_changed", "module": "module.state_changed"}


class Subscription:
    """One subscriber's events not yet sent, oldest first; ``overflowed`` tells why it closed.

    A plain queue rather than a channel: the session sends what is queued
    without yielding between taking an event and sending it, so a reply sent
    after a flush can never overtake an event taken but not yet sent.
    """

    def __init__(self, size: int) -> None:
        #: At most this many unsent events (0: no limit).
        self.size = size
        self.queue: collections.deque[p.Event] = collections.deque()
        self.closed = False
        self.overflowed = False
        #: Cancelled when the subscriber is cut off: its session may be stuck sending to a
        #: full socket (that is how its queue filled up) and must stop waiting on it.
        self.cut_off = trio.CancelScope()
        self._ready = trio.Event()

    def put(self, event: p.Event) -> bool:
        """Queue an event; False if the queue is full."""
        if self.size and len(self.queue) >= self.size:
            return False
        self.queue.append(event)
        self._ready.set()
        return True

    async def wait(self) -> None:
        """Return once an event is queued or the subscription is closed."""
        while not self.queue and not self.closed:
            self._ready = trio.Event()
            await self._ready.wait()

    def close(self) -> None:
        """No more events will be queued."""
        self.closed = True
        self._ready.set()


class EventBus:
    """Numbers events with a monotonic sequence and fans them out."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.last_seq = 0
        self._subscribers: set[Subscription] = set()
        self.history: collections.deque[p.Event] = collections.deque(maxlen=HISTORY)
        #: Set (and replaced) by every publish: what ``wait_until`` sleeps on.
        self._changed = trio.Event()
        #: Events never sent to a subscriber cut off for overflow, and such subscribers (metrics).
        self.dropped = 0
        self.cut_off = 0

    def since(self, seq: int) -> list[p.Event]:
        """The kept events after ``seq``, oldest first."""
        return [event for event in self.history if event.seq > seq]

    def subscribe(self, size: int = DEFAULT_QUEUE) -> Subscription:
        """A new subscriber; it receives every event published from now on."""
        sub = Subscription(max(size, 0))
        self._subscribers.add(sub)
        return sub

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checked after each event; False after ``timeout``.

        Every state change the daemon makes is published here, so this is the
        one place a request can wait for "the module runs again" or "the proxy
        was closed" without a timer of its own.
        """
        with trio.move_on_after(timeout):
            while not predicate():
                await self._changed.wait()
            return True
        return predicate()

    def notify(self) -> None:
        """Wake every ``wait_until`` without an event: a change no client is told of.

        A proxy's own worker (isolation = "proxy") starting is one: its proxy's
        reopen waits for it, but the module's state did not change.
        """
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop sending to ``sub`` and close its queue."""
        self._subscribers.discard(sub)
        sub.close()

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
            time=time.time(),
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
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for sub in list(self._subscribers):
            if not sub.put(event):
                self.dropped += len(sub.queue) + 1  # its unsent queue and this one
                self.cut_off += 1
                sub.overflowed = True
                self.unsubscribe(sub)
                sub.cut_off.cancel()
                log.warning("events.subscriber_overflow", queue=sub.size)
        return event
