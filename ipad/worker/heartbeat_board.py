"""The heartbeat board: a counter a worker bumps in shared memory, read by the daemon.

A PING per worker per interval cost the daemon a send, a wake-up of the
worker's control task and a receive: some 70 microseconds each, 1.4 % of a
CPU with 200 idle workers doing nothing but proving they are alive. Instead
the daemon passes each worker, with LOAD, a memfd of its own (the board);
the worker's event loop wakes at least once per heartbeat interval and bumps
the counter on it, through a shared mapping (no system call). The daemon's
one heartbeat task reads every board once per interval with pread, a
microsecond each, and a worker whose counter has not moved for the
heartbeat timeout is hung: its loop is stuck, exactly when it could not
have answered a PING either.

A beating loop proves the loop turns, not that module code returns: a
module can beat from a thread of its own while its call blocks the loop.
So the board's second counter counts module code entered and left (odd:
module code runs). The daemon sees a call that runs past the module's
``call_timeout`` as a hang, on its own clock: the worker writes no time.

One board per worker: workers never share memory with one another. The
daemon reads with pread and never maps a board, so a worker that truncates
its memfd cannot fault the daemon (the read returns nothing, which reads
as no beat). This module imports nothing of trio: the worker side uses it.
"""

from __future__ import annotations

import mmap
import os
import sys

from ipad.worker.call_stats import STATS_OFFSET, STATS_SIZE

#: The board's size: two unsigned 64-bit counters, beats and module code entered or left.
BOARD_SIZE = 16
#: Where the beat counter ends: the rest is the call counter.
BEAT_SIZE = 8

#: The longest wait a worker's loop takes between beats (epoll's timeout must fit an int of ms).
MAX_BEAT_WAIT = 86400.0


def new_board() -> int:
    """A fresh board (a memfd holding a zero counter), for one worker's LOAD.

    Its second page holds the worker's call statistics (ipad/worker/call_stats.py).
    """
    fd = os.memfd_create("ipad-heartbeat", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, STATS_OFFSET + STATS_SIZE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_board(fd: int) -> bytes:
    """The board's counters as they stand, as bytes to compare (short if it was truncated)."""
    return os.pread(fd, BOARD_SIZE, 0)


def call_running(board: bytes) -> bytes | None:
    """The call counter read from a board if module code runs (odd), to compare; else None.

    A board of 8 bytes (a worker that knows only the beat counter) never runs a call.
    """
    calls = board[BEAT_SIZE:BOARD_SIZE]
    if len(calls) != BOARD_SIZE - BEAT_SIZE or not int.from_bytes(calls, sys.byteorder) & 1:
        return None
    return calls


class Beater:
    """The worker's side: bump the counter on every turn of its event loop."""

    def __init__(self, fd: int, interval: float) -> None:
        self._map = mmap.mmap(fd, BOARD_SIZE)
        self._counter = memoryview(self._map).cast("Q")
        #: Module code entered and left: odd while it runs.
        self.calls = 0
        #: How long the loop may wait for anything before it must beat again.
        self.wait: float
        self.pace(interval)

    def pace(self, interval: float) -> None:
        """Beat at least every ``interval`` seconds from now on (HEARTBEAT changes it)."""
        self.wait = min(interval, MAX_BEAT_WAIT)

    def beat(self) -> None:
        """One beat: the loop is turning."""
        self._counter[0] = (self._counter[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF

    def enter(self) -> None:
        """Module code starts (a call, an instance's constructor or close): the counter is odd."""
        if not self.calls & 1:
            self.calls += 1
        self._counter[1] = self.calls & 0xFFFF_FFFF_FFFF_FFFF

    def leave(self) -> None:
        """Module code returned: the counter is even again."""
        if self.calls & 1:
            self.calls += 1
        self._counter[1] = self.calls & 0xFFFF_FFFF_FFFF_FFFF

    def __enter__(self) -> None:
        """``with beater:`` around module code: entered, and left however it ends."""
        self.enter()

    def __exit__(self, *exc: object) -> None:
        self.leave()
