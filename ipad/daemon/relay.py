"""Worker output relayed into the daemon's log, line by line and rate-limited per worker.

A worker's stdout and stderr are one pipe the daemon reads. Each line becomes
a ``worker.stderr`` record with the worker's ``module`` and ``worker_pid``, so
``journalctl -u ipad MODULE=awb`` shows a module's own words next to the
daemon's records about it, its crashes included. A worker that writes more
than RELAY_BURST lines or RELAY_BYTES bytes within RELAY_INTERVAL has the rest
dropped and counted, and the counts are logged (``worker.stderr_suppressed``)
when the interval ends: one noisy module cannot flood the journal or make the
daemon busy logging. Past its budget the relay stops watching the pipe and
empties it only every RELAY_PAUSE, without splitting lines, so what a flood
costs the daemon is bounded by time, not by what the worker writes (a worker
writing bare newlines held it at 100 % CPU when every line was judged).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import structlog
import trio

from ipad.daemon.reactor import Reactor, TimerHandle, Timers
from ipad.protocol.rate_limit import RateLimit

log = structlog.get_logger("ipad")

#: Longest line relayed as one record; a longer one is cut into pieces of this size.
MAX_LINE = 4096
#: How much of the pipe one read takes.
READ_SIZE = 65536
#: Lines a worker may write per interval before the rest are dropped (and counted).
RELAY_BURST = 200
RELAY_INTERVAL = 10.0
#: Bytes a worker may write per interval before the rest are dropped (and counted).
RELAY_BYTES = 256 * 1024
#: Past its budget, how often a worker's pipe is emptied (what it held dropped and counted).
RELAY_PAUSE = 0.25
#: Reads one emptying takes at most: a pipe holds 64 KiB unless its writer enlarged it.
DRAIN_READS = 16

#: sd-daemon(3) prefixes ("<3>text") that set a line's level, as journald reads them on stderr.
PREFIX_LEVELS = {
    0: "critical", 1: "critical", 2: "critical", 3: "error",
    4: "warning", 5: "info", 6: "info", 7: "debug",
}  # fmt: skip


class LineBuffer:
    """Cuts a byte stream into lines, holding a partial one until its end arrives."""

    __slots__ = ("_partial", "max_line")

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

    def clear(self) -> None:
        """Forget the partial line (its end was dropped)."""
        self._partial = b""

    def flush(self) -> list[bytes]:
        """At end of stream: the last line, if it had no newline."""
        partial, self._partial = self._partial, b""
        return self._cut(partial) if partial else []

    def _cut(self, line: bytes) -> list[bytes]:
        if len(line) <= self.max_line:
            return [line]
        return [line[i : i + self.max_line] for i in range(0, len(line), self.max_line)]


def parse_line(raw: bytes) -> tuple[str, str]:
    """A line's log level and text: ``<N>`` at its start sets the level, else info."""
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if len(text) >= 3 and text[0] == "<" and text[2] == ">" and text[1].isdigit():
        return PREFIX_LEVELS.get(int(text[1]), "info"), text[3:]
    return "info", text


class OutputRelay:
    """Every worker's output pipe, read by the daemon's reactor: no task per pipe.

    ``add`` takes a pipe's read end; its lines are logged as they come, and
    when every writer has closed it (the worker and whatever it left behind
    are gone) the last partial line is logged and the pipe closed. ``close``
    relays whatever is still in every pipe, at the daemon's exit: a worker's
    last words before it was stopped are not lost.
    """

    def __init__(
        self,
        reactor: Reactor,
        timers: Timers,
        clock: Callable[[], float] = trio.current_time,
        limit: Callable[[], RateLimit] = lambda: RateLimit(
            RELAY_INTERVAL, RELAY_BURST, max_bytes=RELAY_BYTES
        ),
    ) -> None:
        self.reactor = reactor
        self.timers = timers
        self.clock = clock
        self._limit = limit
        self._pipes: dict[int, _Pipe] = {}

    def __len__(self) -> int:
        return len(self._pipes)

    def add(self, fd: int, module: str, worker_pid: int) -> None:
        """Relay the pipe ``fd`` (which this takes and closes), naming its worker on each record."""
        os.set_blocking(fd, False)
        pipe = _Pipe(fd, module, worker_pid)
        self._pipes[fd] = pipe
        self.reactor.add(fd, functools.partial(self._readable, pipe))

    def _readable(self, pipe: _Pipe) -> None:
        self._read_once(pipe)

    def _read_once(self, pipe: _Pipe) -> bool | None:
        """Read and relay one chunk: True if one came, False if the pipe is empty, None at end."""
        try:
            data = os.read(pipe.fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._finish(pipe)
            return None
        self._take(pipe, data)
        return True

    def _lines(self, pipe: _Pipe) -> tuple[LineBuffer, RateLimit]:
        """The pipe's line buffer and rate limit, made at its first output.

        Most workers write nothing, and a daemon holds two pipes per module.
        """
        if pipe.lines is None or pipe.limit is None:
            pipe.lines, pipe.limit = LineBuffer(), self._limit()
        return pipe.lines, pipe.limit

    def _take(self, pipe: _Pipe, data: bytes) -> None:
        """Relay ``data``'s lines within the budget; past it, drop and count, and pause."""
        lines, limit = self._lines(pipe)
        now = self.clock()
        self._report(pipe, limit.roll(now))
        taken = limit.take_bytes(len(data))
        if taken:
            pieces = lines.feed(data[:taken])
            for index, raw in enumerate(pieces):
                if not self._relay(pipe, raw, now):
                    limit.suppressed += len(pieces) - index - 1
                    break
        if taken < len(data):
            dropped = memoryview(data)[taken:]
            limit.suppressed += dropped.tobytes().count(b"\n")  # counted, not split: cheap
            limit.dropped_bytes += len(dropped)
            lines.clear()
        if limit.over(now):
            self._pause(pipe)
        if pipe.timer is None and limit.deadline < math.inf:  # report the drops at its end
            pipe.timer = self.timers.call_at(limit.deadline, lambda: self._expire(pipe))

    def _relay(self, pipe: _Pipe, raw: bytes, now: float) -> bool:
        """Log one line if the rate limit allows it; whether it did."""
        assert pipe.limit is not None  # noqa: S101 - made with its lines
        allowed, ended = pipe.limit.allow(now)
        self._report(pipe, ended)
        if allowed:
            level, text = parse_line(raw)
            getattr(log, level)("worker.stderr", module=pipe.module, worker_pid=pipe.pid,
                                text=text)  # fmt: skip
        return allowed

    def _pause(self, pipe: _Pipe) -> None:
        """Stop watching the pipe: it is emptied every RELAY_PAUSE until the budget is back."""
        if pipe.resume is None and not pipe.closed:
            self.reactor.remove(pipe.fd)
            pipe.resume = self.timers.call_later(RELAY_PAUSE, lambda: self._resume(pipe))

    def _resume(self, pipe: _Pipe) -> None:
        """Empty a paused pipe (bounded); watch it again once its budget is back.

        ``pipe.resume`` stays set while it empties: the ``_take`` of what it reads
        must not pause the pipe a second time (two timers, then four...).
        """
        if pipe.closed:
            return
        full = True
        for _ in range(DRAIN_READS):
            read = self._read_once(pipe)
            if read is None:
                return
            if not read:
                full = False
                break
        assert pipe.limit is not None  # noqa: S101 - it wrote, so it has one
        if full or pipe.limit.over(self.clock()):
            pipe.resume = self.timers.call_later(RELAY_PAUSE, lambda: self._resume(pipe))
        else:
            pipe.resume = None
            self.reactor.add(pipe.fd, functools.partial(self._readable, pipe))

    def _expire(self, pipe: _Pipe) -> None:
        pipe.timer = None
        if pipe.limit is not None:
            self._report(pipe, pipe.limit.expire(self.clock()))

    def _report(self, pipe: _Pipe, count: int) -> None:
        limit = pipe.limit
        if limit is None:
            return
        dropped_bytes, limit.ended_bytes = limit.ended_bytes, 0
        if count or dropped_bytes:
            log.warning("worker.stderr_suppressed", module=pipe.module, worker_pid=pipe.pid,
                        suppressed=count, dropped_bytes=dropped_bytes, burst=limit.burst,
                        max_bytes=limit.max_bytes if limit.max_bytes < math.inf else None,
                        interval=limit.interval)  # fmt: skip

    def _finish(self, pipe: _Pipe) -> None:
        """End of the pipe: its last line and suppressed count, then close it."""
        self.reactor.remove(pipe.fd)
        self._pipes.pop(pipe.fd, None)
        for timer in (pipe.timer, pipe.resume):
            if timer is not None:
                timer.cancel()
        pipe.timer = pipe.resume = None
        pipe.closed = True
        rest = _read_available(pipe.fd)
        if rest or pipe.lines is not None:
            if rest:
                self._take(pipe, rest)
            lines, limit = self._lines(pipe)
            for raw in lines.flush():
                self._relay(pipe, raw, self.clock())
            self._report(pipe, limit.flush())
        os.close(pipe.fd)

    def close(self) -> None:
        """Relay what every pipe holds now and close them all (the daemon stops)."""
        for pipe in list(self._pipes.values()):
            self._finish(pipe)


class _Pipe:
    """One relayed pipe: its partial line, its rate limit, the worker its records name."""

    __slots__ = ("closed", "fd", "limit", "lines", "module", "pid", "resume", "timer")

    def __init__(self, fd: int, module: str, pid: int) -> None:
        self.fd = fd
        self.module = module
        self.pid = pid
        self.limit: RateLimit | None = None
        self.lines: LineBuffer | None = None
        self.timer: TimerHandle | None = None
        #: While paused past its budget: the timer that empties it next.
        self.resume: TimerHandle | None = None
        self.closed = False


def _read_available(fd: int) -> bytes:
    """What the pipe holds now, without waiting (bounded: a writer may still be writing)."""
    chunks = []
    for _ in range(DRAIN_READS):
        try:
            chunk = os.read(fd, READ_SIZE)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
