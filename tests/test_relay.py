"""Worker output relaying: lines cut right, levels from sd-daemon prefixes, the rate limit."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from ipad.daemon.reactor import Reactor, Timers
from ipad.daemon.relay import RELAY_PAUSE, LineBuffer, OutputRelay, parse_line
from ipad.protocol.rate_limit import RateLimit


def test_lines_are_cut_at_newlines_and_partials_wait() -> None:
    """A line split across reads is relayed once whole; the last one at end of stream."""
    buffer = LineBuffer()
    assert buffer.feed(b"one\ntw") == [b"one"]
    assert buffer.feed(b"o\n\nthree") == [b"two", b""]
    assert buffer.flush() == [b"three"]
    assert buffer.flush() == []


def test_long_lines_are_relayed_in_pieces() -> None:
    """A line longer than the limit comes in pieces, even before its newline arrives."""
    buffer = LineBuffer(max_line=4)
    assert buffer.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert buffer.feed(b"k\n") == [b"ijk"]
    assert buffer.feed(b"123456789\n") == [b"1234", b"5678", b"9"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"plain words", ("info", "plain words")),
        (b"<3>it broke", ("error", "it broke")),
        (b"<4>careful\r", ("warning", "careful")),
        (b"<7>details", ("debug", "details")),
        (b"<2>", ("critical", "")),
        (b"<x>not a prefix", ("info", "<x>not a prefix")),
        (b"\xff\xfe bytes", ("info", "\ufffd\ufffd bytes")),
    ],
)
def test_levels_from_sd_daemon_prefixes(raw: bytes, expected: tuple[str, str]) -> None:
    """<N> at the start of a line sets its level, as journald reads service stderr."""
    assert parse_line(raw) == expected


def test_rate_limit_counts_what_it_drops_per_interval() -> None:
    """Burst lines per interval pass; the rest are counted and reported once it ends."""
    limit = RateLimit(interval=10.0, burst=2)
    assert [limit.allow(0.0), limit.allow(1.0), limit.allow(2.0), limit.allow(3.0)] == [
        (True, 0), (True, 0), (False, 0), (False, 0),
    ]  # fmt: skip
    assert limit.deadline == 10.0
    assert limit.expire(9.0) == 0  # not yet over
    assert limit.allow(10.5) == (True, 2)  # a new interval: the old one's count comes with it
    assert limit.suppressed == 0
    assert limit.deadline == float("inf")


def test_rate_limit_reports_at_the_deadline_without_new_lines() -> None:
    """A worker that floods then goes quiet still has its drops reported."""
    limit = RateLimit(interval=5.0, burst=1)
    limit.allow(0.0)
    limit.allow(0.1)
    limit.allow(0.2)
    assert limit.expire(5.0) == 2
    assert limit.flush() == 0


async def test_relay_limits_a_flood_and_reports_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flood from a real pipe: burst lines relayed, the rest counted when the interval ends."""
    read_end, write_end = os.pipe()
    reactor, timers = Reactor(), Timers()
    relay = OutputRelay(reactor, timers, limit=lambda: RateLimit(interval=10.0, burst=5))
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            await nursery.start(timers.run)
            relay.add(read_end, module="awb", worker_pid=42)
            os.write(write_end, b"".join(b"line %d\n" % n for n in range(20)))
            await _settle()
            assert [e["text"] for e in logs] == [f"line {n}" for n in range(5)]
            await trio.sleep(11)  # the interval ends with nothing more written
            assert logs[5] == {
                "event": "worker.stderr_suppressed", "log_level": "warning", "module": "awb",
                "worker_pid": 42, "suppressed": 15, "dropped_bytes": 0, "burst": 5,
                "max_bytes": None, "interval": 10.0,
            }  # fmt: skip
            os.write(write_end, b"<3>after\nno newline")
            os.close(write_end)
            await _settle()
            assert len(relay) == 0  # every writer closed it: the relay let it go
            nursery.cancel_scope.cancel()
    reactor.close()
    assert logs[6:] == [
        {"event": "worker.stderr", "log_level": "error", "module": "awb", "worker_pid": 42,
         "text": "after"},
        {"event": "worker.stderr", "log_level": "info", "module": "awb", "worker_pid": 42,
         "text": "no newline"},
    ]  # fmt: skip
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(read_end)  # the relay closed its end


async def test_a_flood_of_bare_newlines_costs_the_daemon_little(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Past its budget a pipe is not split into lines: its bytes are counted, reading pauses."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    reactor, timers = Reactor(), Timers()
    relay = OutputRelay(reactor, timers, limit=lambda: RateLimit(10.0, 5, max_bytes=4096))
    written = 0
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            await nursery.start(timers.run)
            relay.add(read_end, module="awb", worker_pid=42)
            for _ in range(30):  # within the interval, the writer refills what the relay empties
                with contextlib.suppress(BlockingIOError):
                    while True:
                        written += os.write(write_end, b"\n" * 65536)
                await trio.sleep(RELAY_PAUSE)
            assert read_end not in reactor._callbacks  # paused: no wake-up per write
            pending = [h for _, _, h in timers._heap if h.callback is not None]
            assert len(pending) <= 2  # one to empty the pipe, one to report: not one per pause
            await trio.sleep(11)  # the interval ends: its drops are reported
            os.close(write_end)
            await trio.sleep(1)
            assert len(relay) == 0
            nursery.cancel_scope.cancel()
    reactor.close()
    relayed = [e for e in logs if e["event"] == "worker.stderr"]
    reports = [e for e in logs if e["event"] == "worker.stderr_suppressed"]
    assert len(relayed) in (5, 10)  # five per interval: a second one if it wrote into it
    assert sum(e["suppressed"] for e in reports) == written - len(relayed)  # all counted
    assert sum(e["dropped_bytes"] for e in reports) > written - 65536 * 2


async def test_what_is_in_the_pipe_at_the_end_is_still_relayed() -> None:
    """At shutdown the relay is closed with the pipes; lines already written are not lost."""
    read_end, write_end = os.pipe()
    reactor, timers = Reactor(), Timers()
    relay = OutputRelay(reactor, timers)
    with capture_logs() as logs:
        relay.add(read_end, module="agc", worker_pid=7)
        os.write(write_end, b"last words\nand a partial")
        relay.close()
    os.close(write_end)
    reactor.close()
    assert [e["text"] for e in logs] == ["last words", "and a partial"]


async def _settle() -> None:
    """Let the reactor read what was written (a real pipe: the kernel wakes it at once)."""
    for _ in range(10):
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0)
