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

The board also outlives its worker, which makes it the crash report's
channel (docs/operations.md, "Crash reports"). After the counters the worker
keeps a *claim*: the module code it runs (method, instance, since when), one
``pack_into`` per call, no system call. The second page holds the worker's
call statistics (ipad/worker/call_stats.py). From ``DUMP_OFFSET`` on, Python's
faulthandler writes the stacks on a fatal signal, and on SIGUSR1 when the
daemon is about to kill it as hung. The memfd is sealed against growth, so
what a worker writes there is bounded; the daemon reads it with pread once
the worker is dead (or about to be), and treats it as the worker's claim:
clipped, decoded leniently, never trusted. A board of just the counters
(the conformance kit, a native worker) carries neither.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
import time

from ipad.worker.call_stats import STATS_OFFSET

#: The board's size: two unsigned 64-bit counters, beats and module code entered or left.
BOARD_SIZE = 16
#: Where the beat counter ends: the rest is the call counter.
BEAT_SIZE = 8

#: After the counters, the claim, in native order as they are: since (CLOCK_MONOTONIC ns),
#: instance id, flags, text length.
CLAIM_HEADER = struct.Struct("=QQIH")
#: The claim's ``since`` as the third of the board's 64-bit words (written alone per call).
SINCE_WORD = 2
#: The claim's text (the method's name) starts here and ends by ``CLAIM_END``.
CLAIM_TEXT = BOARD_SIZE + CLAIM_HEADER.size
CLAIM_END = 256
#: Claim flag: faulthandler dumps the stacks here on SIGUSR1 (the daemon may ask before a kill).
DUMPS_ON_SIGUSR1 = 1
#: Where faulthandler's stack dumps start, and how much of them the board holds.
DUMP_OFFSET = STATS_OFFSET + mmap.PAGESIZE  # after the call statistics' page (call_stats.py)
DUMP_SIZE = 64 * 1024
#: The whole memfd: its size is sealed, so no worker writes past it.
FILE_SIZE = DUMP_OFFSET + DUMP_SIZE
#: A claimed ``since`` older than this (or in the future) is not believed.
MAX_CLAIM_AGE_NS = 30 * 86400 * 10**9

#: The longest wait a worker's loop takes between beats (epoll's timeout must fit an int of ms).
MAX_BEAT_WAIT = 86400.0


def new_board() -> int:
    """A fresh board (a memfd holding a zero counter), for one worker's LOAD."""
    fd = os.memfd_create("ipad-heartbeat", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, FILE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
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


class Claim:
    """What a dead worker's board claims ran when it died: read from the worker, so not trusted."""

    def __init__(self, method: str, instance_id: int, age: float | None) -> None:
        self.method = method
        self.instance_id = instance_id
        #: Seconds the method had run when the board was read (None: the claim was not believable).
        self.age = age


def read_claim(fd: int) -> Claim | None:
    """The module code a worker's board says runs now; None if none runs or none is claimed.

    Only a board whose call counter is odd (module code runs) has a claim worth
    reading. Every field is checked: a text cut at its room and decoded
    leniently, a ``since`` out of range dropped.
    """
    try:
        data = os.pread(fd, CLAIM_END, 0)
    except OSError:
        return None
    if len(data) < CLAIM_END or call_running(data) is None:
        return None
    since, instance_id, _, length = CLAIM_HEADER.unpack_from(data, BOARD_SIZE)
    text = data[CLAIM_TEXT : CLAIM_TEXT + min(length, CLAIM_END - CLAIM_TEXT)]
    method = text.decode("utf-8", "replace")
    if not method.isprintable() or not method:
        method = repr(method)[1:-1] or "?"
    age_ns = time.monotonic_ns() - since
    age = age_ns / 1e9 if 0 <= age_ns <= MAX_CLAIM_AGE_NS else None
    return Claim(method, instance_id, age)


def dumps_on_sigusr1(fd: int) -> bool:
    """Whether the worker says SIGUSR1 makes it dump its stacks (else SIGUSR1 may kill it)."""
    try:
        data = os.pread(fd, CLAIM_TEXT, 0)
    except OSError:
        return False
    return len(data) == CLAIM_TEXT and bool(
        CLAIM_HEADER.unpack_from(data, BOARD_SIZE)[2] & DUMPS_ON_SIGUSR1
    )


def read_dump(fd: int, limit: int = DUMP_SIZE) -> str:
    """The stacks faulthandler wrote on the board, up to ``limit`` bytes, as text ('' if none)."""
    try:
        data = os.pread(fd, min(limit, DUMP_SIZE), DUMP_OFFSET)
    except OSError:
        return ""
    end = data.find(b"\0")
    return data[: end if end >= 0 else len(data)].decode("utf-8", "replace").rstrip()


class Beater:
    """The worker's side: bump the counter on every turn of its event loop."""

    def __init__(self, fd: int, interval: float) -> None:
        #: A board with room for a claim and a dump (see the module's docstring).
        self.full = os.fstat(fd).st_size >= FILE_SIZE
        self._map = mmap.mmap(fd, CLAIM_END if self.full else BOARD_SIZE)
        self._counter = memoryview(self._map)[: BOARD_SIZE + 8 if self.full else BOARD_SIZE].cast(
            "Q"
        )
        self._flags = 0
        #: What the claim names now: a call of the same method on the same instance
        #: (every frame's ``process``) rewrites only its ``since``.
        self._claimed: tuple[bytes, int] | None = None
        #: Module code entered and left: odd while it runs.
        self.calls = 0
        #: How long the loop may wait for anything before it must beat again.
        self.wait: float
        self.pace(interval)

    def pace(self, interval: float) -> None:
        """Beat at least every ``interval`` seconds from now on (HEARTBEAT changes it)."""
        self.wait = min(interval, MAX_BEAT_WAIT)

    def claim(self, label: bytes, instance_id: int) -> None:
        """Say which module code runs next (``label``: its name, already cut to the room)."""
        if not self.full:
            return
        now = time.monotonic_ns()
        if self._claimed == (label, instance_id):
            self._counter[SINCE_WORD] = now
            return
        CLAIM_HEADER.pack_into(self._map, BOARD_SIZE, now, instance_id, self._flags, len(label))
        self._map[CLAIM_TEXT : CLAIM_TEXT + len(label)] = label
        self._claimed = (label, instance_id)

    def dump_to(self, fd: int) -> int | None:
        """A descriptor at the board's dump area for faulthandler (None: no room on this board).

        SIGUSR1 dumps too, as the flag on the board now says: the daemon asks
        so before it kills the worker as hung.
        """
        if not self.full:
            return None
        dump = os.dup(fd)
        os.lseek(dump, DUMP_OFFSET, os.SEEK_SET)
        self._flags |= DUMPS_ON_SIGUSR1
        CLAIM_HEADER.pack_into(self._map, BOARD_SIZE, 0, 0, self._flags, 0)
        self._claimed = None
        return dump

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
