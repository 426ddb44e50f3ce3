"""Request ids and reply matching on one connection, sans I/O, for both clients.

The daemon connection and every proxy channel, in the trio client and in the
blocking one, keep a RequestBook: it hands out request ids, records what is
pending (and until when it is waited for), and says what a received frame is:
the reply to a pending request, an event, the peer's GOODBYE, or a reply to
drop (late, for a request its caller gave up on; unknown, for one never made
or answered already). The drivers only send, wait and wake: a reply is never
handed to the wrong caller, and ids are never reused on a connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ipad.client._backlog import RawModuleEvent
from ipad.protocol import wire as p

#: Given-up requests remembered per connection, so their late replies are told from strays.
GIVEN_UP_KEPT = 1024


class Match(enum.Enum):
    """What a received frame is, for the connection's book."""

    #: Answers a pending request: kept in its entry until collected.
    REPLY = "reply"
    #: A daemon or module event: the driver queues it.
    EVENT = "event"
    #: The peer says why it is closing.
    GOODBYE = "goodbye"
    #: Answers a request whose caller gave up (deadline, cancel): dropped, as expected.
    LATE = "late"
    #: Answers nothing pending (never asked, or answered already): dropped.
    UNKNOWN = "unknown"


class PendingRequest:
    """One request sent and not yet collected: its reply or its error once known."""

    __slots__ = ("deadline", "error", "frame", "request_id", "wake")

    def __init__(
        self, request_id: int, deadline: float | None, wake: Callable[[], None] | None
    ) -> None:
        self.request_id = request_id
        #: Until when the reply is waited for (None: no limit).
        self.deadline = deadline
        #: Called once the reply or the connection's end is known (a trio driver wakes its waiter).
        self.wake = wake
        self.frame: p.Frame | None = None
        self.error: Callable[[], Exception] | None = None

    @property
    def done(self) -> bool:
        """Whether the reply came or the connection ended."""
        return self.frame is not None or self.error is not None


class RequestBook:
    """The requests of one connection: ids, what is pending, what each frame answers."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.last_id = 0
        #: The last request sent: the one a worker that died with packets unread never read.
        self.newest: int | None = None
        #: The channel ended with ECONNRESET: its newest request was never read.
        self.reset = False
        #: Replies dropped: late ones (their caller gave up) and unknown ones.
        self.late = 0
        self.unknown = 0
        self._pending: dict[int, PendingRequest] = {}
        #: Requests whose caller gave up before the reply (in order, the oldest first).
        self.given_up: dict[int, None] = {}
        self._closed: Callable[[], Exception] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: int) -> bool:
        """Whether ``request_id`` is pending (sent, not collected nor given up)."""
        return request_id in self._pending

    @property
    def dropped(self) -> int:
        """Replies nobody took."""
        return self.late + self.unknown

    def open(
        self, deadline: float | None = None, wake: Callable[[], None] | None = None
    ) -> PendingRequest:
        """A new request's entry, to be sent now; the connection's error if it has ended."""
        if self._closed is not None:
            raise self._closed()
        self.last_id += 1
        entry = self._pending[self.last_id] = PendingRequest(self.last_id, deadline, wake)
        self.newest = self.last_id
        return entry

    def unsent(self, request_id: int) -> None:
        """Sending it failed: nothing will answer it."""
        self._pending.pop(request_id, None)

    def take(self, frame: p.Frame) -> Match:
        """Say what ``frame`` is; a reply to a pending request is kept for it (and woken).

        The fds of a LATE or UNKNOWN reply are closed here.
        """
        message = frame.message
        if isinstance(message, p.Event | p.ModuleEvent | RawModuleEvent):
            return Match.EVENT
        if isinstance(message, p.Goodbye):
            return Match.GOODBYE
        entry = self._pending.get(frame.request_id)
        if entry is not None and not entry.done:
            entry.frame = frame
            if entry.wake is not None:
                entry.wake()
            return Match.REPLY
        frame.close_fds()
        if self.given_up.pop(frame.request_id, 0) is None:
            self.late += 1
            return Match.LATE
        self.unknown += 1
        return Match.UNKNOWN

    def collect(self, request_id: int) -> p.Frame | None:
        """The reply to ``request_id`` once it came (it is no longer pending), else None.

        Raises the connection's error if it ended first.
        """
        entry = self._pending.get(request_id)
        if entry is None:
            raise KeyError(request_id)
        if entry.frame is not None:
            del self._pending[request_id]
            return entry.frame
        if entry.error is not None:
            del self._pending[request_id]
            raise entry.error()
        return None

    def wait_until(self, request_id: int, deadline: float | None) -> None:
        """A caller now waits for ``request_id`` until ``deadline`` (a kept grant's next caller)."""
        self._pending[request_id].deadline = deadline

    def overdue(self, request_id: int, now: float) -> bool:
        """Whether the wait for ``request_id`` is past its deadline."""
        deadline = self._pending[request_id].deadline
        return deadline is not None and now >= deadline

    def give_up(self, request_id: int) -> None:
        """The caller no longer waits: a reply already here is dropped, a later one will be."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        if entry.frame is not None:
            entry.frame.close_fds()
            self.late += 1
        elif entry.error is None:
            self.given_up[request_id] = None
            if len(self.given_up) > GIVEN_UP_KEPT:
                del self.given_up[next(iter(self.given_up))]

    def never_ran(self, request_id: int) -> bool:
        """Whether ``request_id`` was surely not read by the worker before the channel ended."""
        return self.reset and request_id == self.newest

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """The connection ended: every request still unanswered fails, and so does every later one.

        ``error`` makes each caller its own exception, so tracebacks do not pile up on one.
        """
        self._closed = error
        for entry in self._pending.values():
            if not entry.done:
                entry.error = error
                if entry.wake is not None:
                    entry.wake()

    @property
    def closed(self) -> bool:
        """Whether the connection ended (``fail_all``)."""
        return self._closed is not None

    def close(self) -> None:
        """Drop what is pending; the fds of replies never collected are closed."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.frame is not None:
                entry.frame.close_fds()
