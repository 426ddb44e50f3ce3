"""Worker output relayed into the daemon's log, line by line and rate-limited per worker.

A worker's stdout and stderr are one pipe the daemon reads. Each line becomes
a ``worker.stderr`` record with the worker's ``module`` and ``worker_pid``, so
``journalctl -u ipad MODULE=awb`` shows a module's own words next to the
daemon's records about it, its crashes included. A worker that writes more
than RELAY_BURST lines within RELAY_INTERVAL has the rest dropped and counted,
and the count is logged (``worker.stderr_suppressed``) when the interval ends:
one noisy module cannot flood the journal or make the daemon busy logging.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import structlog
import trio

log = structlog.get_logger("ipad")

#: Longest line relayed as one record; a longer one is cut into pieces of this size.
MAX_LINE = 4096
#: How much of the pipe one read takes.
READ_SIZE = 65536
#: Lines a worker may write per interval before the rest are dropped (and counted).
RELAY_BURST = 200
RELAY_INTERVAL = 10.0

#: sd-daemon(3) prefixes ("<3>text") that set a line's level, as journald reads them on stderr.
PREFIX_LEVELS = {
    0: "critical", 1: "critical", 2: "critical", 3: "error",
    4: "warning", 5: "info", 6: "info", 7: "debug",
}  # fmt: skip


class LineBuffer:
    """Cuts a byte stream into lines, holding a partial one until its end arrives."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines ``data`` finishes (without their newlines)."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) >= self.max_line:  # no newline in sight: relay it in pieces
            lines.append(self._partial[: self.max_line])
            self._partial = self._partial[self.max_line :]
        return [piece for line in lines for piece in self._cut(line)]

    def flush(self) -> list[bytes]:
        """At end of stream: the last line, if it had no newline."""
        partial, self._partial = self._partial, b""
        return self._cut(partial) if partial else []

    def _cut(self, line: bytes) -> list[bytes]:
        if len(line) <= self.max_line:
            return [line]
        return [line[i : i + self.max_line] for i in range(0, len(line), self.max_line)]


class RateLimit:
    """At most ``burst`` lines per ``interval`` seconds; the rest are counted, as journald does."""

    def __init__(self, interval: float = RELAY_INTERVAL, burst: int = RELAY_BURST) -> None:
        self.interval = interval
        self.burst = burst
        self._start = -math.inf
        self._passed = 0
        self.suppressed = 0

    def _roll(self, now: float) -> int:
        """Start a new interval if this one is over; return what the old one suppressed."""
        if now - self._start < self.interval:
            return 0
        ended, self.suppressed = self.suppressed, 0
        self._start, self._passed = now, 0
        return ended

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
        return self._start + self.interval if self.suppressed else math.inf

    def expire(self, now: float) -> int:
        """At the deadline: the count to report, and a fresh interval."""
        return self._roll(now) if self.suppressed else 0

    def flush(self) -> int:
        """At end of stream: whatever is still suppressed."""
        ended, self.suppressed = self.suppressed, 0
        return ended


def parse_line(raw: bytes) -> tuple[str, str]:
    """A line's log level and text: ``<N>`` at its start sets the level, else info."""
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if len(text) >= 3 and text[0] == "<" and text[2] == ">" and text[1].isdigit():
        return PREFIX_LEVELS.get(int(text[1]), "info"), text[3:]
    return "info", text


async def relay_output(
    fd: int,
    limit: RateLimit | None = None,
    clock: Callable[[], float] = trio.current_time,
    **fields: object,
) -> None:
    """Relay the pipe ``fd`` (which this takes and closes) until every writer has closed it.

    ``fields`` (``module``, ``worker_pid``) go on every record. Cancelled (the
    daemon stops), it still relays what is already in the pipe: a worker's
    last words before it was stopped are not lost.
    """
    limit = limit or RateLimit()
    lines = LineBuffer()
    bound = log.bind(**fields)

    def report(count: int) -> None:
        if count:
            bound.warning("worker.stderr_suppressed", suppressed=count, burst=limit.burst,
                          interval=limit.interval)  # fmt: skip

    def relay(raw: bytes) -> None:
        allowed, ended = limit.allow(clock())
        report(ended)
        if allowed:
            level, text = parse_line(raw)
            getattr(bound, level)("worker.stderr", text=text)

    async with trio.lowlevel.FdStream(fd) as stream:  # non-blocking, closed at the end
        try:
            while True:
                data = None
                with trio.move_on_at(limit.deadline):
                    data = await stream.receive_some(READ_SIZE)
                if data is None:  # the interval ended while the worker was quiet
                    report(limit.expire(clock()))
                    continue
                if not data:
                    break
                for raw in lines.feed(data):
                    relay(raw)
        finally:
            for raw in [*lines.feed(_read_available(stream.fileno())), *lines.flush()]:
                relay(raw)
            report(limit.flush())


def _read_available(fd: int) -> bytes:
    """Whatever the pipe holds now, without waiting."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
