"""Packets and descriptors over real SEQPACKET socketpairs, blocking and through trio."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet
from ipad.protocol.rate_limit import RateLimit
from ipad.transport import seqpacket
from ipad.transport.seqpacket import PacketSocket, Requests


@pytest.fixture(autouse=True)
def _fresh_drop_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the process-wide reply.dropped rate limit unused."""
    fresh = RateLimit(seqpacket.DROPPED_INTERVAL, seqpacket.DROPPED_BURST)
    monkeypatch.setattr(seqpacket, "DROPPED_WARNINGS", fresh)


def open_fd_count() -> int:
    """How many descriptors this process has open, once garbage from earlier tests is freed."""
    gc.collect()  # a socket left in a reference cycle must not close in the middle of a count
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def is_closed(fd: int) -> bool:
    """True if ``fd`` is not an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected SOCK_SEQPACKET sockets, as the daemon, workers and clients use."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A socketpair closed after the test."""
    a, b = seqpacket_pair()
    with a, b:
        yield a, b


def raise_send_buffer(sock: socket.socket, packet_size: int) -> None:
    """Let ``sock`` send one packet of ``packet_size`` bytes, or skip the test if the kernel won't."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * packet_size)
    # Linux refuses a datagram larger than the send buffer less a small overhead.
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if granted < packet_size + 4096:
        pytest.skip(
            f"SO_SNDBUF is capped at {granted} bytes (net.core.wmem_max), "
            f"too small to send a {packet_size}-byte packet"
        )


def drained_pipe() -> tuple[int, int]:
    """A pipe whose read end does not block, to see the write end's last copy close as EOF."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    return read_end, write_end


def write_end_closed_everywhere(read_end: int) -> bool:
    """True once every copy of the pipe's write end is closed (the read end sees EOF)."""
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


# --- blocking send_packet / recv_packet ------------------------------------------------


@pytest.mark.timeout(10)
def test_packet_arrives_with_its_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    """Passed fds arrive in order and refer to the same open files as the sender's."""
    a, b = pair
    read_end, write_end = os.pipe()
    memfd = os.memfd_create("frame", os.MFD_CLOEXEC)
    try:
        os.write(memfd, b"pixels")
        call = p.Call("process", {"frame": 1}, ("out", "frame"))
        send_packet(a, p.encode(call, 5, 2), [write_end, memfd])
        received = recv_packet(b)
        assert received is not None
        data, fds = received
        frame = p.decode(data, fds, allowed=p.TO_WORKER_CHANNEL)
        try:
            assert frame.message == call
            assert frame.request_id == 5
            assert len(frame.fds) == 2
            assert not {write_end, memfd} & set(frame.fds)  # new numbers, same files
            got_write_end, got_memfd = frame.fds
            os.write(got_write_end, b"through the passed fd")
            assert os.read(read_end, 100) == b"through the passed fd"
            assert os.pread(got_memfd, 100, 0) == b"pixels"
            assert os.fstat(got_memfd).st_ino == os.fstat(memfd).st_ino
        finally:
            frame.close_fds()
    finally:
        p.close_fds([read_end, write_end, memfd])


@pytest.mark.timeout(10)
def test_received_fds_are_close_on_exec(pair: tuple[socket.socket, socket.socket]) -> None:
    """An fd the sender left inheritable arrives close-on-exec, so no later worker inherits it."""
    a, b = pair
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        send_packet(a, p.encode(p.OpenInstance(1), 1, 1), [write_end])
        received = recv_packet(b)
        assert received is not None
        _, [fd] = received
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(fd)
    finally:
        p.close_fds([read_end, write_end])


@pytest.mark.timeout(10)
def test_packets_keep_their_boundaries(pair: tuple[socket.socket, socket.socket]) -> None:
    """Two packets sent back to back are received as two packets, each whole."""
    a, b = pair
    first, second = p.encode(p.Ping(), 1), p.encode(p.Goodbye("done"), 2)
    send_packet(a, first)
    send_packet(a, second)
    assert recv_packet(b) == (first, [])
    assert recv_packet(b) == (second, [])


@pytest.mark.timeout(10)
def test_largest_packet_arrives_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    """A packet of exactly MAX_PACKET bytes (the largest valid one) is received and decoded."""
    a, b = pair
    raise_send_buffer(a, p.MAX_PACKET)
    message = p.Result(b"x" * (p.MAX_PAYLOAD - 12))  # 12 bytes of msgpack around the value
    packet = p.encode(message, 3)
    assert len(packet) == p.MAX_PACKET
    send_packet(a, packet)
    received = recv_packet(b)
    assert received is not None
    assert p.decode(*received).message == message


@pytest.mark.timeout(10)
def test_oversized_packet_is_refused_and_its_fds_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A packet one byte over MAX_PACKET is a ProtocolError, and the fds that came with it close."""
    a, b = pair
    raise_send_buffer(a, p.MAX_PACKET + 1)
    read_end, write_end = os.pipe()
    try:
        baseline = open_fd_count()
        send_packet(a, b"IP" + b"x" * (p.MAX_PACKET - 1), [read_end, write_end])
        with pytest.raises(p.ProtocolError, match=f"^packet larger than {p.MAX_PACKET} bytes$"):
            recv_packet(b)
        assert open_fd_count() == baseline
    finally:
        p.close_fds([read_end, write_end])
    # The connection stays usable: the next packet arrives normally.
    send_packet(a, p.encode(p.Ping(), 2))
    assert recv_packet(b) == (p.encode(p.Ping(), 2), [])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("count", [p.MAX_FDS + 1, 3 * p.MAX_FDS])
def test_too_many_fds_are_refused_and_none_leak(
    pair: tuple[socket.socket, socket.socket], count: int
) -> None:
    """More than MAX_FDS fds is a ProtocolError, and none of them stays open on the receiver."""
    a, b = pair
    read_end, write_end = os.pipe()
    fds = [os.dup(read_end) for _ in range(count)]
    try:
        baseline = open_fd_count()
        send_packet(a, p.encode(p.Call("f"), 1), fds)
        with pytest.raises(p.ProtocolError, match=f"^more than {p.MAX_FDS} file descriptors$"):
            recv_packet(b)
        assert open_fd_count() == baseline
    finally:
        p.close_fds([read_end, write_end, *fds])


@pytest.mark.timeout(10)
def test_max_fds_all_arrive(pair: tuple[socket.socket, socket.socket]) -> None:
    """Exactly MAX_FDS fds, the most a CALL may carry, all arrive."""
    a, b = pair
    read_end, write_end = os.pipe()
    try:
        send_packet(a, p.encode(p.Call("f"), 1, p.MAX_FDS), [read_end] * p.MAX_FDS)
        received = recv_packet(b)
        assert received is not None
        frame = p.decode(*received)
        assert len(frame.fds) == p.MAX_FDS
        frame.close_fds()
    finally:
        p.close_fds([read_end, write_end])


@pytest.mark.timeout(10)
def test_peer_closing_is_end_of_stream() -> None:
    """When the peer closes its end, recv_packet returns None instead of a packet."""
    a, b = seqpacket_pair()
    with b:
        send_packet(a, p.encode(p.Goodbye("bye"), 0))
        a.close()
        assert recv_packet(b) == (p.encode(p.Goodbye("bye"), 0), [])
        assert recv_packet(b) is None


# --- trio: PacketSocket and Requests -------------------------------------------------------


def packet_sockets(
    ours: frozenset[p.MsgType], theirs: frozenset[p.MsgType]
) -> tuple[PacketSocket, PacketSocket]:
    """Both ends of a socketpair as PacketSockets, each accepting what its side receives."""
    a, b = seqpacket_pair()
    return PacketSocket(a, ours), PacketSocket(b, theirs)


async def deliver_replies(conn: PacketSocket, requests: Requests) -> None:
    """The caller side's reader: hand every reply to ``requests`` until end of stream."""
    while (frame := await conn.receive()) is not None:
        requests.deliver(frame)


@pytest.mark.timeout(10)
async def test_concurrent_requests_get_their_own_replies() -> None:
    """Calls in flight together on one connection each get their reply, answered in any order."""
    ours, theirs = packet_sockets(p.FROM_WORKER_CHANNEL, p.TO_WORKER_CHANNEL)
    requests = Requests("test")
    callers = 20
    seen_ids: list[int] = []
    results: dict[int, object] = {}

    async def peer() -> None:
        frames = []
        for _ in range(callers):
            frame = await theirs.receive()
            assert frame is not None
            frames.append(frame)
        seen_ids.extend(f.request_id for f in frames)
        # Answer last first, each reply followed by one with id 0, which matches nobody.
        for frame in reversed(frames):
            assert isinstance(frame.message, p.Call)
            await theirs.send(p.Result(frame.message.args["n"] * 10), frame.request_id)
            await theirs.send(p.Result("unsolicited"), 0)

    async def caller(n: int) -> None:
        frame = await requests.call(ours, p.Call("scale", {"n": n}))
        assert isinstance(frame.message, p.Result)
        results[n] = frame.message.value

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver_replies, ours, requests)
            nursery.start_soon(peer)
            async with trio.open_nursery() as calls:
                for n in range(callers):
                    calls.start_soon(caller, n)
            nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()
    assert results == {n: n * 10 for n in range(callers)}
    assert sorted(seen_ids) == list(range(1, callers + 1))  # distinct, none reused
    assert len(requests) == 0
    # Replies with id 0 match no caller: each is dropped and logged.
    assert all(e["event"] == "reply.dropped" and e["request_id"] == 0 for e in logs)


@pytest.mark.timeout(10)
async def test_reply_to_a_cancelled_request_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A late reply is logged, its fds closed, and never handed to the next caller."""
    ours, theirs = packet_sockets(p.FROM_DAEMON, p.FROM_CLIENT)
    requests = Requests("daemon")
    read_end, write_end = drained_pipe()
    caller_gave_up = trio.Event()

    def granted(module: str) -> p.ProxyGranted:
        return p.ProxyGranted(1, module, "1.0", 42, (), "valid", 1)

    async def peer() -> None:
        first = await theirs.receive()
        assert first is not None
        await caller_gave_up.wait()
        # The answer to the abandoned request comes first, with a channel fd.
        await theirs.send(granted("first"), first.request_id, [write_end])
        os.close(write_end)  # now the receiver holds the only copy
        second = await theirs.receive()
        assert second is not None
        assert isinstance(second.message, p.RequestProxy)
        await theirs.send(granted(second.message.module), second.request_id)

    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver_replies, ours, requests)
                nursery.start_soon(peer)
                with trio.move_on_after(0.01) as scope:
                    await requests.call(ours, p.RequestProxy("first"))
                assert scope.cancelled_caught
                assert len(requests) == 0
                caller_gave_up.set()
                frame = await requests.call(ours, p.RequestProxy("second"))
                nursery.cancel_scope.cancel()
        assert frame.request_id == 2
        assert frame.message == granted("second")
        assert frame.fds == ()
        assert logs == [
            {
                "event": "reply.dropped",
                "log_level": "warning",
                "connection": "daemon",
                "request_id": 1,
                "message": "PROXY_GRANTED",
            }
        ]
        assert write_end_closed_everywhere(read_end)
    finally:
        os.close(read_end)
        ours.close()
        theirs.close()


@pytest.mark.timeout(10)
async def test_reply_racing_a_cancellation_is_dropped() -> None:
    """A reply handed over in the same scheduling round as the caller's cancellation is dropped."""
    ours, theirs = packet_sockets(p.FROM_DAEMON, p.FROM_CLIENT)
    requests = Requests("daemon")
    read_end, write_end = drained_pipe()
    scope = trio.CancelScope()

    async def caller() -> None:
        with scope:
            await requests.call(ours, p.RequestProxy("awb"))

    try:
        with structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                request = await theirs.receive()
                assert request is not None
                await trio.testing.wait_all_tasks_blocked()
                # The deadline fires and the reader delivers before the caller runs again.
                scope.cancel()
                reply = p.ProxyGranted(1, "awb", "1.0", 42, (), "valid", 1)
                requests.deliver(p.Frame(reply, request.request_id, (write_end,)))
        assert [e["event"] for e in logs] == ["reply.dropped"]
        assert is_closed(write_end)
    finally:
        p.close_fds([read_end, write_end])
        ours.close()
        theirs.close()


@pytest.mark.timeout(10)
async def test_fail_all_fails_every_waiter_and_later_calls() -> None:
    """fail_all wakes every waiting caller with its own exception, and later calls fail at once."""
    ours, theirs = packet_sockets(p.FROM_WORKER_CONTROL, p.TO_WORKER_CONTROL)
    requests = Requests("worker")
    errors: list[ConnectionError] = []

    async def caller() -> None:
        try:
            await requests.call(ours, p.Ping())
        except ConnectionError as exc:
            errors.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
            for _ in range(3):
                assert await theirs.receive() is not None
            await trio.testing.wait_all_tasks_blocked()
            assert len(requests) == 3
            requests.fail_all(lambda: ConnectionError("worker went away"))
        assert len(errors) == 3
        assert len({id(e) for e in errors}) == 3  # one exception each, no shared traceback
        assert all(str(e) == "worker went away" for e in errors)
        assert len(requests) == 0
        with pytest.raises(ConnectionError, match=r"^worker went away$"):
            await requests.call(ours, p.Ping())
        # A later call is refused before anything is sent (trio's sockets do not block).
        with pytest.raises(BlockingIOError):
            os.read(theirs.sock.fileno(), p.MAX_PACKET)
        # A reply that still arrives matches nobody.
        with structlog.testing.capture_logs() as logs:
            assert not requests.deliver(p.Frame(p.Pong(), 1))
        assert logs[0]["event"] == "reply.dropped"
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(10)
async def test_packet_socket_refuses_a_type_it_does_not_accept() -> None:
    """A CALL arriving where daemon messages are expected is a ProtocolError, its fds closed."""
    ours, theirs = packet_sockets(p.FROM_DAEMON, p.FROM_CLIENT)
    read_end, write_end = drained_pipe()
    try:
        await theirs.send(p.Call("f", fd_args=("out",)), 4, [write_end])
        os.close(write_end)
        with pytest.raises(p.ProtocolError, match=r"^unexpected message CALL$") as info:
            await ours.receive()
        assert info.value.request_id == 4
        assert write_end_closed_everywhere(read_end)
    finally:
        os.close(read_end)
        ours.close()
        theirs.close()


@pytest.mark.timeout(10)
async def test_packet_socket_sees_end_of_stream() -> None:
    """PacketSocket.receive returns None once the peer has closed its end."""
    ours, theirs = packet_sockets(p.FROM_DAEMON, p.FROM_CLIENT)
    theirs.close()
    assert await ours.receive() is None
    ours.close()


@pytest.mark.timeout(10)
async def test_send_nowait_never_waits_for_a_peer_that_does_not_read() -> None:
    """A full socket refuses send_nowait at once, and it never overtakes a send that waits."""
    ours, theirs = packet_sockets(p.FROM_WORKER_CONTROL, p.TO_WORKER_CONTROL)
    sent = 0
    while ours.send_nowait(p.CloseInstance(sent)):  # the peer reads nothing: it fills up
        sent += 1
    assert sent > 0
    assert not ours.send_nowait(p.CloseInstance(sent))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ours.send, p.Shutdown())  # waits for room, holding the send lock
        await trio.testing.wait_all_tasks_blocked()
        assert not ours.send_nowait(p.CloseInstance(-1))  # behind the waiting send: refused
        received: list[p.Frame] = []
        while len(received) < sent + 1:
            frame = await theirs.receive()
            assert frame is not None
            received.append(frame)
    kinds = [type(frame.message).__name__ for frame in received]
    assert kinds == ["CloseInstance"] * sent + ["Shutdown"]  # in order; the refused one: never
    ours.close()
    theirs.close()


async def test_dropped_reply_warnings_are_rate_limited() -> None:
    """Replies to ids never sent: DROPPED_BURST warnings, the rest counted and reported once."""
    requests = Requests("proxy:1")
    with structlog.testing.capture_logs() as logs:
        for request_id in range(1, 1001):
            assert not requests.deliver(p.Frame(p.Result(None), request_id))
        seqpacket.report_suppressed_drops()
        seqpacket.report_suppressed_drops()  # nothing left to report
    assert [e["event"] for e in logs] == ["reply.dropped"] * seqpacket.DROPPED_BURST + [
        "reply.dropped_suppressed"
    ]
    assert logs[-1]["count"] == 1000 - seqpacket.DROPPED_BURST
