"""A module whose worker lies to the daemon through what it controls.

Its code runs in the worker, which holds the control socket to the daemon on
fd 3: it writes packets there that ipad's worker host never sends (replies to
requests never made, closes of instances it does not hold, huge strings,
malformed packets, a flood of descriptors), and floods its own stderr.
"""

from __future__ import annotations

import os
import socket
import sys

from ipad.ipa import IPAModule
from ipad.protocol import wire as p
from ipad.protocol.fdpass import rights

__version__ = "1.0.0"

#: The worker's control socket (ipad/worker/host.py).
CONTROL_FD = 3


def _control() -> socket.socket:
    return socket.socket(fileno=os.dup(CONTROL_FD))


class Liar(IPAModule):
    """One attack per method; each returns how many packets it sent."""

    def close_reason(self, size: int, instance_ids: list[int]) -> int:
        """INSTANCE_CLOSED for each of ``instance_ids`` with a reason of ``size`` bytes."""
        with _control() as sock:
            for instance_id in instance_ids:
                sock.sendmsg([p.encode(p.InstanceClosed(instance_id, "r" * size))])
        return len(instance_ids)

    def flood(self, kind: str, count: int) -> int:
        """``count`` packets: ``replies`` to ids never sent, ``late`` replies, ``closes``."""
        if kind == "replies":
            packet = p.encode(p.Pong(), request_id=2**40)
        elif kind == "late":
            packet = p.encode(p.Pong(), request_id=1)  # LOAD's id: sent, answered long ago
        else:
            packet = p.encode(p.InstanceClosed(10**9, "no such instance"))
        sent = 0
        with _control() as sock:
            sock.settimeout(5.0)  # as fast as the daemon reads them
            for _ in range(count):
                try:
                    sock.send(packet)
                except OSError:  # the daemon has stopped reading: it is killing us
                    break
                sent += 1
        return sent

    def malformed(self, how: str) -> int:
        """One bad packet: ``hello`` (not a worker's message), ``huge`` (past the buffer), ``fds``."""
        with _control() as sock:
            if how == "hello":
                sock.send(p.encode(p.Hello((1,))))
            elif how == "huge":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * p.MAX_PACKET)
                sock.send(b"IP" + b"\0" * (2 * p.MAX_PACKET))
            else:  # 200 descriptors with one packet: past MAX_FDS, the kernel truncates
                fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(200)]
                try:
                    sock.sendmsg([p.encode(p.Pong(), request_id=1)], rights(fds))
                finally:
                    for fd in fds:
                        os.close(fd)
        return 1

    def newlines(self, megabytes: int) -> int:
        """Write bare newlines to stderr: ``megabytes`` MiB of them."""
        chunk = b"\n" * 65536
        for _ in range(megabytes * 16):
            os.write(sys.stderr.fileno(), chunk)
        return megabytes

    def ping(self) -> str:
        """Answer: the worker is alive."""
        return "pong"
