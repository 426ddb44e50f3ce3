"""No descriptor outlives its message: many cycles, half of them malformed, leave the count flat."""

from __future__ import annotations

import gc
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet

CYCLES = 1000

#: Ways to spoil a valid CALL packet that announces ``nfds`` fds, each refused by decode.
Spoiler = Callable[[bytes], bytes]


def _set(offset: int, fmt: str, value: int) -> Spoiler:
    def spoil(packet: bytes) -> bytes:
        damaged = bytearray(packet)
        struct.pack_into(fmt, damaged, offset, value)
        return bytes(damaged)

    return spoil


SPOILERS: list[tuple[str, Spoiler]] = [
    ("bad magic", lambda packet: b"XY" + packet[2:]),
    ("version", _set(2, "<B", 9)),
    ("unknown type", _set(3, "<B", 200)),
    ("flags", _set(4, "<H", 1)),
    ("fd count", _set(6, "<H", p.MAX_FDS)),
    ("type not allowed", _set(3, "<B", p.MsgType.STATUS)),
    ("length", _set(16, "<I", 1)),
    ("truncated", lambda packet: packet[:-1]),
    ("short", lambda packet: packet[:10]),
    ("payload", lambda packet: packet[: p.HEADER_SIZE - 4] + struct.pack("<I", 1) + b"\xc1"),
]


def open_fd_count() -> int:
    """How many descriptors this process has open, once garbage from earlier tests is freed."""
    gc.collect()  # a socket left in a reference cycle must not close in the middle of a count
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def call_packet(cycle: int, nfds: int) -> bytes:
    """A valid CALL whose fds go to ``nfds`` Buffer parameters."""
    names = tuple(f"buf{i}" for i in range(nfds))
    return p.encode(p.Call("process", {"cycle": cycle}, names), cycle + 1, nfds)


def test_encode_decode_cycles_leave_no_fd_open() -> None:
    """A thousand decodes with fds, half refused, end with as many open fds as they began."""
    read_end, write_end = os.pipe()
    try:
        baseline = open_fd_count()
        refused: dict[str, int] = {}
        for cycle in range(CYCLES):
            nfds = 1 + cycle % 3
            fds = [os.dup(read_end) for _ in range(nfds)]
            packet = call_packet(cycle, nfds)
            if cycle % 2:
                name, spoil = SPOILERS[(cycle // 2) % len(SPOILERS)]
                with pytest.raises(p.ProtocolError):
                    p.decode(spoil(packet), fds, allowed=p.TO_WORKER_CHANNEL)
                refused[name] = refused.get(name, 0) + 1
            else:
                frame = p.decode(packet, fds, allowed=p.TO_WORKER_CHANNEL)
                assert frame.fds == tuple(fds)
                frame.close_fds()
        assert sum(refused.values()) == CYCLES // 2
        assert set(refused) == {name for name, _ in SPOILERS}
        assert open_fd_count() == baseline
    finally:
        p.close_fds([read_end, write_end])


@pytest.mark.timeout(30)
def test_socket_cycles_leave_no_fd_open() -> None:
    """The same through a socketpair, with too many fds for one cycle in ten, leaks nothing."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    try:
        baseline = open_fd_count()
        refused = 0
        for cycle in range(CYCLES):
            nfds = 1 + cycle % 3
            packet = call_packet(cycle, nfds)
            if cycle % 10 == 1:
                # More fds than a receiver makes room for: the kernel truncates, we close.
                nfds = p.MAX_FDS + 1 + cycle % 5
            elif cycle % 2:
                packet = SPOILERS[(cycle // 2) % len(SPOILERS)][1](packet)
            send_packet(sender, packet, [read_end] * nfds)
            try:
                received = recv_packet(receiver)
                assert received is not None
                frame = p.decode(*received, allowed=p.TO_WORKER_CHANNEL)
            except p.ProtocolError:
                refused += 1
            else:
                assert len(frame.fds) == nfds
                frame.close_fds()
        assert refused == CYCLES // 2
        assert open_fd_count() == baseline
    finally:
        p.close_fds([read_end, write_end])
        sender.close()
        receiver.close()
