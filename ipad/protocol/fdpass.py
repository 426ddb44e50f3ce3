"""Packets with file descriptors over SOCK_SEQPACKET sockets, for blocking code.

The worker host and the blocking client use these directly; the trio transport
shares ``unpack_received`` so both sides judge truncation the same way.
"""

from __future__ import annotations

import array
import contextlib
import socket
from _thread import _local
from collections.abc import Sequence

from ipad.protocol.wire import MAX_FDS, MAX_PACKET, ProtocolError, close_fds

#: Room for MAX_FDS descriptors; more than that sets MSG_CTRUNC and the kernel closes the rest.
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

#: A started worker's control socket: the descriptor number the daemon (ipad/daemon/spawn.py),
#: the jail (ipad/worker/jail.py) and the worker host (ipad/worker/host.py) agree on.
CONTROL_FD = 3
#: Where ``start_process`` puts its ``extra`` descriptor (the jail's cgroup).
EXTRA_FD = 4

#: Received descriptors are close-on-exec so a worker spawned later never inherits them.
RECV_FLAGS = socket.MSG_CMSG_CLOEXEC

#: As plain ints: ``flags & socket.MSG_TRUNC`` goes through IntFlag's Python ``__and__``.
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def unpack_received(
    data: bytes,
    ancdata: list[tuple[int, int, bytes]],
    msg_flags: int,
    max_packet: int = MAX_PACKET,
) -> tuple[bytes, list[int]] | None:
    """Turn a recvmsg result into (packet, fds); None at end of stream.

    A truncated packet or descriptor list is a ProtocolError, with every
    descriptor that did arrive already closed. ``max_packet`` is the receive
    buffer's size, for the message.
    """
    fds = fds_from_ancdata(ancdata)
    if msg_flags & _MSG_TRUNC:
        close_fds(fds)
        raise ProtocolError(f"packet larger than {max_packet} bytes")
    if msg_flags & _MSG_CTRUNC:
        close_fds(fds)
        raise ProtocolError(f"more than {MAX_FDS} file descriptors")
    if not data:
        close_fds(fds)
        return None  # our packets are never empty: this is the peer's end of stream
    return data, fds


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in SCM_RIGHTS control messages."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    return fds


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fds``."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


#: setsockopt(2) SO_SNDBUFFORCE (Python's socket module lacks it): as SO_SNDBUF, past
#: net.core.wmem_max, for a process with CAP_NET_ADMIN.
SO_SNDBUFFORCE = 32

#: The send buffer a SEQPACKET socket needs: Linux refuses (EMSGSIZE) a message larger
#: than the buffer less 32 bytes, and the default (net.core.wmem_default, 212992 bytes)
#: is below MAX_PACKET. Twice the packet, so one can queue while another is read.
SEND_BUFFER = 2 * MAX_PACKET + 4096


def size_send_buffer(sock: socket.socket) -> bool:
    """Make ``sock``'s send buffer hold a MAX_PACKET message; False if the kernel will not.

    The kernel doubles what SO_SNDBUF asks and caps the request at
    net.core.wmem_max, so an unprivileged process needs a wmem_max of at least
    half a packet (MIN_WMEM_MAX); root raises it past the cap with SO_SNDBUFFORCE.
    """
    level, name = socket.SOL_SOCKET, socket.SO_SNDBUF
    if sock.getsockopt(level, name) >= SEND_BUFFER:
        return True
    sock.setsockopt(level, name, SEND_BUFFER // 2)
    if sock.getsockopt(level, name) >= SEND_BUFFER:
        return True
    with contextlib.suppress(PermissionError):
        sock.setsockopt(level, SO_SNDBUFFORCE, SEND_BUFFER // 2)
    return sock.getsockopt(level, name) >= MAX_PACKET + 32


#: The net.core.wmem_max an unprivileged process needs for a MAX_PACKET message (above).
MIN_WMEM_MAX = (MAX_PACKET + 32 + 1) // 2


def sized_socketpair() -> tuple[socket.socket, socket.socket]:
    """A close-on-exec SEQPACKET socket pair whose ends each send a MAX_PACKET message."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for end in pair:
        size_send_buffer(end)
    return pair


def send_packet(sock: socket.socket, packet: bytes, fds: Sequence[int] = ()) -> None:
    """Send one packet with its descriptors (which stay open on this side)."""
    sock.sendmsg([packet], rights(fds))


class _Buffers(_local):
    """One receive buffer per thread, reused for every packet that thread receives.

    ``threading.local`` is this same class; importing ``threading`` itself would
    register its after-fork handler in the fork server, which then runs in every
    forked worker: about 65 page faults and 0.3 ms more for each fork, measured.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(MAX_PACKET))


_BUFFERS = _Buffers()


def receive_into_buffer(
    sock: socket.socket, size: int = MAX_PACKET
) -> tuple[bytes, list[tuple[int, int, bytes]], int]:
    """Receive at most ``size`` bytes into this thread's buffer: packet (copied), ancdata, flags.

    A fresh buffer of MAX_PACKET bytes per packet, as ``recvmsg(MAX_PACKET)``
    makes, is an mmap and an munmap each time (it is above malloc's mmap
    threshold); a call's round trip paid that twice at each end.
    """
    view = _BUFFERS.view[:size]
    nbytes, ancdata, msg_flags, _ = sock.recvmsg_into([view], ANCILLARY_SIZE, RECV_FLAGS)
    return bytes(view[:nbytes]), ancdata, msg_flags


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """Receive one packet and its descriptors; None at end of stream."""
    return unpack_received(*receive_into_buffer(sock))
