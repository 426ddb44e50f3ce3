"""Heartbeat boards: a worker's loop bumps a shared counter, the daemon reads it, no PING."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ipad.daemon.heartbeat import Heartbeats
from ipad.daemon.worker_process import WorkerProcess
from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet
from ipad.transport.seqpacket import PacketSocket
from ipad.worker.heartbeat_board import BOARD_SIZE, Beater, new_board, read_board
from ipad.worker.host import WorkerHost

REPO = Path(__file__).resolve().parent.parent
MODULES = REPO / "workers" / "modules"
TUNING = REPO / "workers" / "tuning" / "echo" / "uncalibrated.toml"

INTERVAL = 1.0
TIMEOUT = 3.0


def test_a_beat_moves_the_counter_the_daemon_reads() -> None:
    board = new_board()
    try:
        beater = Beater(board, INTERVAL)
        first = read_board(board)
        beater.beat()
        second = read_board(board)
        beater.beat()
        assert len(first) == BOARD_SIZE
        assert len({first, second, read_board(board)}) == 3
    finally:
        os.close(board)


def test_a_truncated_board_reads_as_no_beat() -> None:
    """A worker can shrink its memfd; the daemon, which never maps it, just reads nothing."""
    board = new_board()
    try:
        os.ftruncate(board, 0)
        assert read_board(board) == b""
    finally:
        os.close(board)


# --- the worker host's side, over a real control socket ------------------------------


@pytest.fixture
def host() -> Iterator[socket.socket]:
    """A worker host serving in a thread; the daemon's end of its control socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = WorkerHost(theirs)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield ours
    send_packet(ours, p.encode(p.Shutdown()))
    thread.join(5)
    ours.close()
    theirs.close()
    assert not thread.is_alive()


def load(sock: socket.socket, interval: float, board: int | None) -> p.Ready:
    message = p.Load("echo", "ipa_modules.echo:Echo", str(MODULES), str(TUNING), interval)
    fds = () if board is None else (board,)
    send_packet(sock, p.encode(message, 1, len(fds)), fds)
    received = recv_packet(sock)
    assert received is not None
    ready = p.decode(*received).message
    assert isinstance(ready, p.Ready), ready
    return ready


def test_a_worker_given_a_board_beats_on_it_while_idle(host: socket.socket) -> None:
    board = new_board()
    try:
        ready = load(host, 0.02, board)
        assert ready.beats
        seen = {read_board(board)}
        for _ in range(50):
            threading.Event().wait(0.01)
            seen.add(read_board(board))
        assert len(seen) >= 3  # it woke by itself, with nothing sent to it
    finally:
        os.close(board)


def test_a_worker_given_no_board_answers_ping(host: socket.socket) -> None:
    ready = load(host, 0.0, None)
    assert not ready.beats
    send_packet(host, p.encode(p.Ping(), 2))
    received = recv_packet(host)
    assert received is not None
    frame = p.decode(*received)
    assert (type(frame.message), frame.request_id) == (p.Pong, 2)


# --- the daemon's side: hung once the counter stops ------------------------------------


class BoardWorker:
    """A worker as the heartbeat task sees it, beating on its board while ``beating``."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = WorkerProcess("m", 0, -1, ours)
        self.process.board = new_board()
        self.end = PacketSocket(theirs, p.TO_WORKER_CONTROL)
        self.beater = Beater(self.process.board, INTERVAL)
        self.beating = True
        self.pings = 0

    async def beat(self) -> None:
        """Beat twice an interval, while ``beating``."""
        while True:
            if self.beating:
                self.beater.beat()
            await trio.sleep(INTERVAL / 2)

    async def serve(self) -> None:
        """Count the PINGs that arrive (none should)."""
        while await self.end.receive() is not None:
            self.pings += 1


@pytest.fixture
async def ticking() -> AsyncIterator[tuple[Heartbeats, trio.Nursery, list[BoardWorker]]]:
    beats = Heartbeats()
    made: list[BoardWorker] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(beats.run)
        yield beats, nursery, made
        nursery.cancel_scope.cancel()
    for worker in made:
        worker.process.close()
        worker.end.close()


async def watched(
    ticking: tuple[Heartbeats, trio.Nursery, list[BoardWorker]], hung: list[WorkerProcess]
) -> BoardWorker:
    beats, nursery, made = ticking
    worker = BoardWorker()
    made.append(worker)
    nursery.start_soon(worker.beat)
    nursery.start_soon(worker.serve)
    beats.watch(worker.process, INTERVAL, TIMEOUT, lambda w, _how: hung.append(w))
    return worker


async def test_a_beating_worker_is_never_hung_and_never_pinged(
    ticking: tuple[Heartbeats, trio.Nursery, list[BoardWorker]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    hung: list[WorkerProcess] = []
    worker = await watched(ticking, hung)
    await trio.sleep(20 * INTERVAL)
    assert hung == []
    assert worker.pings == 0


async def test_a_worker_whose_counter_stops_is_hung_once_after_the_timeout(
    ticking: tuple[Heartbeats, trio.Nursery, list[BoardWorker]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    hung: list[WorkerProcess] = []
    stuck = await watched(ticking, hung)
    healthy = await watched(ticking, hung)
    await trio.sleep(2 * INTERVAL + 0.25)
    stuck.beating = False
    stopped = trio.current_time()
    while not hung:
        await trio.sleep(0.1)
    waited = trio.current_time() - stopped
    assert TIMEOUT - INTERVAL / 2 <= waited <= TIMEOUT + 2 * INTERVAL
    assert hung == [stuck.process]
    await trio.sleep(5 * INTERVAL)
    assert hung == [stuck.process]  # reported once; the other one beats on
    assert healthy.pings == 0


async def test_a_truncated_board_is_a_hang_and_harms_nobody_reading_it(
    ticking: tuple[Heartbeats, trio.Nursery, list[BoardWorker]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A worker shrinking its memfd: the daemon's reads (here, this process's) go on."""
    hung: list[WorkerProcess] = []
    worker = await watched(ticking, hung)
    await trio.sleep(2 * INTERVAL)
    assert worker.process.board is not None
    worker.beating = False  # the test's own mapping of it would fault once it shrinks
    os.ftruncate(worker.process.board, 0)
    await trio.sleep(TIMEOUT + 2 * INTERVAL)
    assert hung == [worker.process]


async def test_a_forgotten_worker_is_not_looked_at(
    ticking: tuple[Heartbeats, trio.Nursery, list[BoardWorker]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    beats, _, _ = ticking
    hung: list[WorkerProcess] = []
    worker = await watched(ticking, hung)
    await trio.sleep(2 * INTERVAL)
    beats.forget(worker.process)
    worker.beating = False
    await trio.sleep(10 * INTERVAL)
    assert hung == []


def test_a_standby_beats_slowly_until_heartbeat_brings_it_to_the_interval(
    host: socket.socket,
) -> None:
    """Loaded with an hour's beat (as a standby is), then promoted with HEARTBEAT."""
    board = new_board()
    try:
        assert load(host, 3600.0, board).beats
        threading.Event().wait(0.05)  # its loop turns once more after READY: that beat
        before = read_board(board)
        threading.Event().wait(0.2)
        assert read_board(board) == before  # idle and nobody asked: no wake-up, no beat
        send_packet(host, p.encode(p.Heartbeat(0.02)))
        seen = set()
        for _ in range(50):
            threading.Event().wait(0.01)
            seen.add(read_board(board))
        assert len(seen) >= 3
    finally:
        os.close(board)
