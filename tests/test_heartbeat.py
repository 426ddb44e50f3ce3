"""Heartbeats from one task: pings on every tick, a hang seen once its PING waits too long."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from ipad.daemon.heartbeat import Heartbeats
from ipad.daemon.worker_process import WorkerProcess
from ipad.protocol import wire as p
from ipad.transport.seqpacket import PacketSocket

INTERVAL = 1.0
TIMEOUT = 3.0


class FakeWorker:
    """The worker's end of a control socket: answers PING with PONG while ``answering``."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = WorkerProcess("m", 0, -1, ours)
        self.end = PacketSocket(theirs, p.TO_WORKER_CONTROL)
        self.answering = True
        self.pings = 0

    async def serve(self) -> None:
        """Answer until the daemon's end is closed."""
        while (frame := await self.end.receive()) is not None:
            self.pings += 1
            if self.answering:
                await self.end.send(p.Pong(), frame.request_id)


#: Every fake worker a test made, closed after it.
MADE: list[FakeWorker] = []


@pytest.fixture
async def ticking() -> AsyncIterator[tuple[Heartbeats, trio.Nursery]]:
    beats = Heartbeats()
    async with trio.open_nursery() as nursery:
        await nursery.start(beats.run)
        yield beats, nursery
        nursery.cancel_scope.cancel()
    while MADE:
        worker = MADE.pop()
        worker.process.close()
        worker.end.close()


async def watched(
    beats: Heartbeats, nursery: trio.Nursery, hung: list[WorkerProcess]
) -> FakeWorker:
    worker = FakeWorker()
    MADE.append(worker)
    nursery.start_soon(worker.serve)
    nursery.start_soon(worker.process.read_control)
    beats.watch(worker.process, INTERVAL, TIMEOUT, lambda w, _how: hung.append(w))
    return worker


async def test_an_answering_worker_is_pinged_every_interval_and_never_hung(
    ticking: tuple[Heartbeats, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    """Ten intervals: ten PINGs, all answered, no hang."""
    beats, nursery = ticking
    hung: list[WorkerProcess] = []
    worker = await watched(beats, nursery, hung)
    await trio.sleep(10 * INTERVAL + 0.5)
    assert worker.pings == 10
    assert hung == []


async def test_a_silent_worker_is_hung_once_its_ping_waits_the_timeout(
    ticking: tuple[Heartbeats, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    """Once PONGs stop, the hang is reported once, timeout (at most one interval more) later."""
    beats, nursery = ticking
    hung: list[WorkerProcess] = []
    silent = await watched(beats, nursery, hung)
    healthy = await watched(beats, nursery, hung)
    await trio.sleep(2 * INTERVAL + 0.5)
    silent.answering = False
    stopped = trio.current_time()
    while not hung:
        await trio.sleep(0.1)
    waited = trio.current_time() - stopped
    assert TIMEOUT <= waited <= TIMEOUT + 2 * INTERVAL
    assert hung == [silent.process]
    await trio.sleep(5 * INTERVAL)
    assert hung == [silent.process]  # reported once; the other one still answers
    assert healthy.pings >= 9


async def test_forgotten_workers_are_not_pinged(
    ticking: tuple[Heartbeats, trio.Nursery], autojump_clock: trio.testing.MockClock
) -> None:
    """After forget(), no PING goes out and no hang is reported."""
    beats, nursery = ticking
    hung: list[WorkerProcess] = []
    worker = await watched(beats, nursery, hung)
    await trio.sleep(3 * INTERVAL + 0.5)
    beats.forget(worker.process)
    before = worker.pings
    worker.answering = False
    await trio.sleep(10 * INTERVAL)
    assert worker.pings == before
    assert hung == []
