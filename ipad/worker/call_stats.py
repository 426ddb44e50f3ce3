"""Call statistics a worker keeps on its heartbeat board's second page, read by the daemon.

A client calls its worker directly, never through the daemon, so only the
worker sees calls: it counts them (per latency bucket), their total latency
and their errors (per code) in shared memory, with no system call and no
message. The board is the memfd the daemon passes with LOAD
(ipad/worker/heartbeat_board.py); the statistics live from ``STATS_OFFSET``
on, a page of their own, so the heartbeat counters' layout is untouched.
The daemon reads them with pread, also after the worker died (it holds the
memfd), so a SIGKILL loses no call. Everything here is a worker's word: the
daemon trusts none of it as is (ipad/daemon/metrics.py bounds it). This
module imports nothing of trio: the worker side uses it.
"""

from __future__ import annotations

import bisect
import mmap
import os

from ipad.protocol.wire import ErrorCode

#: Where the statistics start in the board: page-aligned, so the worker maps them apart.
STATS_OFFSET = mmap.PAGESIZE
#: Upper bounds of the latency buckets, in seconds: a camera's calls, 100 us to 1 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0)  # fmt: skip
_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)
#: The error codes counted, each in its own slot; a code not listed counts as the last slot.
ERROR_CODES: tuple[str, ...] = tuple(code.value for code in ErrorCode)
_ERROR_SLOT = {code: i for i, code in enumerate(ERROR_CODES)}
#: Slots: total latency (ns), one per bucket and +Inf, one per error code and "other".
SUM_SLOT = 0
BUCKET_SLOT = 1
ERROR_SLOT = BUCKET_SLOT + len(LATENCY_BUCKETS) + 1
SLOTS = ERROR_SLOT + len(ERROR_CODES) + 1
STATS_SIZE = 8 * SLOTS
_MASK = 0xFFFF_FFFF_FFFF_FFFF


def read_stats(fd: int) -> tuple[int, ...] | None:
    """The statistics on a board as they stand (daemon side); None if there are none to read."""
    try:
        data = os.pread(fd, STATS_SIZE, STATS_OFFSET)
    except OSError:
        return None
    if len(data) != STATS_SIZE:  # truncated by the worker, or an old board
        return None
    return tuple(memoryview(data).cast("Q"))


class CallStats:
    """The worker's side: record each call's latency and outcome on the board."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, STATS_SIZE, offset=STATS_OFFSET)
        self._slots = memoryview(self._map).cast("Q")

    @classmethod
    def attach(cls, fd: int) -> CallStats | None:
        """Map the statistics page of board ``fd`` if it has one (a smaller board: None)."""
        if os.fstat(fd).st_size < STATS_OFFSET + STATS_SIZE:
            return None  # mapping past the end would fault (SIGBUS) on the first write
        return cls(fd)

    def record(self, nanoseconds: int, error: str | None) -> None:
        """One call that took ``nanoseconds``; ``error`` is its ERROR code, None if it succeeded.

        The bucket is written after the sum and before the error, so a reader
        never sees more errors than calls.
        """
        slots = self._slots
        slots[SUM_SLOT] = (slots[SUM_SLOT] + max(nanoseconds, 0)) & _MASK
        index = BUCKET_SLOT + bisect.bisect_left(_BOUNDS_NS, nanoseconds)  # first bound >= it
        slots[index] = (slots[index] + 1) & _MASK
        if error is not None:
            slot = ERROR_SLOT + _ERROR_SLOT.get(error, len(ERROR_CODES))
            slots[slot] = (slots[slot] + 1) & _MASK
