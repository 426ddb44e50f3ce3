"""One task for the descriptors and timers of every worker, instead of a few tasks per worker.

A trio task costs the daemon a few KiB (its frames, its cancel scope): the
pidfd, control socket and output pipe of every worker and standby, each
watched by a task of its own, made up most of what a module cost. Here one
epoll set holds them all, trio waits on that set's own descriptor, and a
readable one gets its callback: short, synchronous code that reads what is
there without waiting and feeds it on. Timers (a module's backoff, its
stable-run mark) are one heap, served by one more task.

A callback that raises is logged and its descriptor dropped: a bug met by
one worker must not stop the daemon watching all the others.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger("ipad")

#: Most descriptors handled per wake-up; the rest wait for the next pass (level-triggered).
BATCH = 256


class Reactor:
    """Descriptors watched for reading, each with the callback that reads it."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def __len__(self) -> int:
        return len(self._callbacks)

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable (or hung up) until ``remove``."""
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``; do it before closing it, whose number may come back."""
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve callbacks until cancelled."""
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            self.poll()

    def poll(self) -> None:
        """Call back every descriptor readable now, without waiting."""
        for fd, _ in self._epoll.poll(0, BATCH):
            callback = self._callbacks.get(fd)
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                log.exception("reactor.callback_failed", fd=fd)
                self.remove(fd)

    def close(self) -> None:
        """Close the epoll set (the descriptors in it stay open: they are their owners')."""
        self._callbacks.clear()
        self._epoll.close()


class TimerHandle:
    """A timer ``Timers.call_at`` set; ``cancel`` forgets it."""

    __slots__ = ("callback", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None] | None) -> None:
        self.deadline = deadline
        self.callback = callback

    def cancel(self) -> None:
        """It will not be called (it stays in the heap until its time, costing nothing)."""
        self.callback = None


class Timers:
    """Every timer of the daemon's modules and workers, served by one task."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._order = itertools.count()
        self._wake = trio.Event()

    def call_at(self, deadline: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` at trio time ``deadline`` (or soon after)."""
        handle = TimerHandle(deadline, callback)
        heapq.heappush(self._heap, (deadline, next(self._order), handle))
        if self._heap[0][2] is handle:
            self._wake.set()  # a new earliest deadline: the task sleeps on an older one
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` after ``delay`` seconds."""
        return self.call_at(trio.current_time() + delay, callback)

    def move_on_after(self, seconds: float) -> MoveOnAfter:
        """``trio.move_on_after``, its deadline kept here rather than in trio's own heap.

        trio keeps a deadline that was left early in its heap, with its whole
        cancel scope, until the deadline passes: a 200-module start left 800
        such scopes (fork and LOAD timeouts, seconds long) and the daemon that
        much bigger for good. Here only a small handle waits out its time.
        """
        return MoveOnAfter(self, seconds)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire timers as they come due, until cancelled."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            deadline = self._heap[0][0] if self._heap else math.inf
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self.fire(trio.current_time())

    def fire(self, now: float) -> None:
        """Call every timer due by ``now``, in deadline order."""
        while self._heap and self._heap[0][0] <= now:
            _, _, handle = heapq.heappop(self._heap)
            callback, handle.callback = handle.callback, None
            if callback is None:
                continue
            try:
                callback()
            except Exception:
                log.exception("timer.callback_failed")


class MoveOnAfter:
    """The context manager ``Timers.move_on_after`` returns; ``cancelled_caught`` as trio's."""

    __slots__ = ("_handle", "_scope", "_seconds", "_timers")

    def __init__(self, timers: Timers, seconds: float) -> None:
        self._timers = timers
        self._seconds = seconds
        self._scope = trio.CancelScope()
        self._handle: TimerHandle | None = None

    @property
    def cancelled_caught(self) -> bool:
        """Whether the time ran out (or something else cancelled the block) and it moved on."""
        return self._scope.cancelled_caught

    def __enter__(self) -> MoveOnAfter:
        self._scope.__enter__()
        self._handle = self._timers.call_later(self._seconds, self._scope.cancel)
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        return self._scope.__exit__(*exc)  # type: ignore[arg-type]


class Flag:
    """A one-way flag tasks can wait for; a trio.Event is made only once someone waits.

    Every worker has a few ("exited", "control ended") that nobody awaits most
    of the time: an Event and its parking lot cost about half a KiB each.
    """

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: trio.Event | None = None

    def is_set(self) -> bool:
        """Whether ``set`` was called."""
        return self._set

    def set(self) -> None:
        """Set it for good and wake every waiter."""
        self._set = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Return once it is set (a checkpoint either way)."""
        if self._set:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()
