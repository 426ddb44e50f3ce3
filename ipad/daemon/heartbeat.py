"""Heartbeats for every running worker, from one task per interval instead of one per worker.

Each tick reads the heartbeat board of every watched worker that beats on
one (ipad/worker/heartbeat_board.py) and declares hung any whose counter has not
moved for its timeout; a worker without a board is sent PING instead, and is
hung once its PING has waited longer than the timeout. A task per worker
woke once a second each, cold, for a few hundred microseconds: with 200
workers that was 4 % of a CPU doing nothing else. One tick does it for all
of them in one warm loop: a pread per board, and for PING only the send (the
replies just set an event: nobody wakes to wait for them).

A hang is seen ``heartbeat_timeout`` after the last beat (or the unanswered
PING), give or take one interval: the ticks are when anything is looked at.
A board also says when module code runs (its call counter is odd): one call
seen running for ``call_timeout`` is a hang too, however the beats move (a
module's own thread can beat while its call blocks the loop).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from ipad.daemon.worker_process import WorkerCrashed, WorkerProcess
from ipad.protocol import wire as p
from ipad.transport.seqpacket import Pending
from ipad.worker.heartbeat_board import call_running, read_board


@attrs.define(eq=False)
class _Watched:
    """One worker under watch: its timeout, what to call when it hangs, its PING in flight."""

    worker: WorkerProcess
    timeout: float
    #: Called once with the worker and how it hung: ``board``, ``ping`` or ``call``.
    on_hung: Callable[[WorkerProcess, str], None]
    #: How long one call may run (None: no limit).
    call_timeout: float | None = None
    #: The unanswered PING and when it was sent.
    ping: Pending | None = None
    sent: float = 0.0
    #: When a PING first found no room in its socket (None: the last one went out).
    unsent: float | None = None
    #: A board worker's counter as last read, and when it was last seen to move.
    beat: bytes = b""
    beat_seen: float = 0.0
    #: The call counter of the call seen running, and when it was first seen.
    call: bytes | None = None
    call_seen: float = 0.0


class _Group:
    """The workers watched at one interval, and the task that ticks for them."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.watched: dict[WorkerProcess, _Watched] = {}
        self.wake = trio.Event()

    async def run(self) -> None:
        while True:
            if not self.watched:
                self.wake = trio.Event()
                await self.wake.wait()  # no worker at this interval for now
            await trio.sleep(self.interval)
            await self.tick(trio.current_time())

    async def tick(self, now: float) -> None:
        """Look at every watched worker once: read its board or ping it, or find it hung."""
        for entry in list(self.watched.values()):
            if self.watched.get(entry.worker) is not entry:
                continue  # forgotten while an earlier PING was being sent: its board is closed
            board = entry.worker.board
            if board is not None:
                self._look_at_board(entry, board, now)
                continue
            if entry.ping is not None:
                _, slot = entry.ping
                if not slot.done.is_set():
                    if now - entry.sent >= entry.timeout:
                        self._hung(entry, "ping")
                    continue
                entry.worker.requests.forget(entry.ping)
            try:
                # Never waits: one worker that does not read its socket must not hold up
                # the tick of every other.
                pending = entry.worker.requests.send_nowait(entry.worker.control, p.Ping())
            except (WorkerCrashed, OSError, trio.ClosedResourceError):
                self.watched.pop(entry.worker, None)  # it died: its exit is being handled
                continue
            if pending is None:  # no room: it does not read; silent since the first refusal
                if entry.unsent is None:
                    entry.unsent = now
                elif now - entry.unsent >= entry.timeout:
                    self._hung(entry, "ping")
                continue
            entry.ping, entry.sent, entry.unsent = pending, now, None

    def _look_at_board(self, entry: _Watched, board: int, now: float) -> None:
        try:
            beat = read_board(board)
        except OSError:
            beat = b""  # unreadable: no beat (its exit, if it died, is being handled)
        if beat and beat != entry.beat:
            entry.beat, entry.beat_seen = beat, now
        elif now - entry.beat_seen >= entry.timeout:
            self._hung(entry, "board")
            return
        call = call_running(beat)
        if call is None or entry.call_timeout is None:
            entry.call = None
        elif call != entry.call:
            entry.call, entry.call_seen = call, now  # a call first seen now: timed from here
        elif now - entry.call_seen >= entry.call_timeout:
            self._hung(entry, "call")

    def _hung(self, entry: _Watched, how: str) -> None:
        """Stop watching a hung worker and report it, once."""
        self.watched.pop(entry.worker, None)
        entry.on_hung(entry.worker, how)


class Heartbeats:
    """Every running worker's heartbeat; ``run`` must be running for any to be sent."""

    def __init__(self) -> None:
        self._groups: dict[float, _Group] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick for every interval in use; ``started`` at once."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            for group in self._groups.values():  # watched before we ran
                nursery.start_soon(group.run)
            await trio.sleep_forever()

    def watch(
        self,
        worker: WorkerProcess,
        interval: float,
        timeout: float,
        on_hung: Callable[[WorkerProcess, str], None],
        call_timeout: float | None = None,
    ) -> None:
        """Check ``worker`` every ``interval``; call ``on_hung`` once it is silent ``timeout``.

        Silent: its board's counter has not moved, or (without a board) its PING
        is unanswered. Stuck: its board shows one call running for ``call_timeout``.
        """
        group = self._groups.get(interval)
        if group is None:
            group = self._groups[interval] = _Group(interval)
            if self._nursery is not None:
                self._nursery.start_soon(group.run)
        group.watched[worker] = _Watched(
            worker, timeout, on_hung, call_timeout, beat_seen=trio.current_time()
        )
        group.wake.set()

    def forget(self, worker: WorkerProcess) -> None:
        """Stop watching ``worker`` (it ended, or is being stopped)."""
        for group in self._groups.values():
            entry = group.watched.pop(worker, None)
            if entry is not None and entry.ping is not None:
                worker.requests.forget(entry.ping)
