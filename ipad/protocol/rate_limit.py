"""A rate limit for log lines and bytes: pure bookkeeping, no I/O, no clock of its own.

Shared by the daemon (the output relay, refusals and abuse of clients) and
both clients (dropped replies), so it lives apart from either: a client must
not import the daemon's output relay to count its own warnings.
"""

from __future__ import annotations

import math


class RateLimit:
    """At most ``burst`` lines per ``interval`` seconds; the rest are counted, as journald does.

    With ``max_bytes``, also at most that many bytes (``take_bytes``); the bytes
    dropped are counted in ``dropped_bytes`` and, once an interval ends, in
    ``ended_bytes`` until reported.
    """

    __slots__ = (
        "_bytes", "_passed", "_start", "burst", "dropped_bytes", "ended_bytes", "interval",
        "max_bytes", "suppressed",
    )  # fmt: skip

    def __init__(
        self, interval: float, burst: int,
        max_bytes: float = math.inf,
    ) -> None:  # fmt: skip
        self.interval = interval
        self.burst = burst
        self.max_bytes = max_bytes
        self._start = -math.inf
        self._passed = 0
        self._bytes: float = 0
        self.suppressed = 0
        self.dropped_bytes = 0
        self.ended_bytes = 0

    def _roll(self, now: float) -> int:
        """Start a new interval if this one is over; return what the old one suppressed."""
        if now - self._start < self.interval:
            return 0
        ended, self.suppressed = self.suppressed, 0
        self.ended_bytes += self.dropped_bytes
        self._start, self._passed, self._bytes, self.dropped_bytes = now, 0, 0, 0
        return ended

    def roll(self, now: float) -> int:
        """Start a new interval if this one is over; return what the old one suppressed."""
        return self._roll(now)

    def take_bytes(self, count: int) -> int:
        """How many of ``count`` more bytes are within this interval's budget (lines and bytes).

        Past it the interval's budget is spent: what follows is dropped until it ends.
        """
        if self._passed >= self.burst:
            return 0
        taken = int(min(count, self.max_bytes - self._bytes))
        self._bytes += taken
        return taken

    def over(self, now: float) -> bool:
        """Whether this interval's budget is spent (False once a new interval is due)."""
        if now - self._start >= self.interval:
            return False
        return self._passed >= self.burst or self._bytes >= self.max_bytes

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether a line at ``now`` is relayed, and how many an interval just ended suppressed."""
        ended = self._roll(now)
        if self._passed < self.burst:
            self._passed += 1
            return True, ended
        self.suppressed += 1
        return False, ended

    @property
    def deadline(self) -> float:
        """When the suppressed lines are to be reported (never, if there are none)."""
        dropped = self.suppressed or self.dropped_bytes
        return self._start + self.interval if dropped else math.inf

    def expire(self, now: float) -> int:
        """At the deadline: the count to report, and a fresh interval."""
        return self._roll(now) if self.suppressed or self.dropped_bytes else 0

    def flush(self) -> int:
        """At end of stream: whatever is still suppressed."""
        ended, self.suppressed = self.suppressed, 0
        self.ended_bytes += self.dropped_bytes
        self.dropped_bytes = 0
        return ended
