"""A hostile module for the red team: attacks on deadlines, the board and standbys.

Like ``stuck`` it reaches into the worker host that runs it (found among the
live objects, as any module can) to do what ipad's own code never does.

Tuning keys (all optional):
  standby_exit = true  -- a standby's worker exits during its LOAD (its heartbeat
                          pace gives it away: a standby beats once an hour), so
                          the daemon relaunches one after another
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

from ipad.ipa import IPAModule, ModuleContext
from ipad.protocol import wire as p
from ipad.worker.host import WorkerHost

__version__ = "1.0.0"

#: Processes that flood a channel at once (``flood_hidden``).
FLOODERS = 3

#: A standby's heartbeat pace, or slower (ipad/daemon/supervisor.py STANDBY_BEAT).
STANDBY_PACE = 3600.0


def _host() -> WorkerHost:
    """The worker host serving this module (one per worker process)."""
    hosts = [o for o in gc.get_objects() if isinstance(o, WorkerHost)]
    if len(hosts) != 1:
        raise RuntimeError(f"{len(hosts)} worker hosts in this process")
    return hosts[0]


def _is_standby() -> bool:
    beater = _host().beater
    return beater is not None and beater.wait >= STANDBY_PACE


class Rogue(IPAModule):
    """Each method attacks its own worker or the daemon through it, but ``pid`` and ``ping``."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        if context.instance_id == 0 and context.tuning.get("standby_exit") and _is_standby():
            os._exit(7)

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def ping(self) -> str:
        """An answer, at once."""
        return "pong"

    def flood_hidden(self, kind: str, seconds: float) -> None:
        """Never answer for ``seconds`` while the channel never falls silent.

        One thread keeps the board saying "alive, no call runs" (beats moving,
        the call counter even: a forgery the daemon cannot see through), another
        floods this instance's channel with ``kind``: ``reply`` (answers to a call
        nobody made) or ``event``. The client has its deadline, and nothing else.
        """
        host = _host()
        beater = host.beater
        sock = host.instances[self.context.instance_id].sock
        if beater is None:
            raise RuntimeError("this worker has no heartbeat board")
        until = time.monotonic() + seconds
        # Encoded once, decoded by the client each time: costlier to read than to send.
        load = list(range(20_000))
        if kind == "reply":
            packet = p.encode(p.Result(load), 0x7FFF_FFF0)
        else:
            packet = p.encode(p.ModuleEvent("tick", load), 0)

        def forge() -> None:
            counter = memoryview(beater._map).cast("Q")
            while time.monotonic() < until:
                beater.beat()
                counter[1] = 0
                time.sleep(0.02)

        def flood() -> None:
            while time.monotonic() < until:
                try:
                    sock.send(packet)
                except OSError:
                    return

        threading.Thread(target=forge, daemon=True).start()
        # Processes of its own flood too (its process group ends with the worker): a
        # native worker could flood at memory speed, one Python thread cannot keep up.
        for _ in range(FLOODERS):
            if os.fork() == 0:
                flood()
                os._exit(0)
        time.sleep(seconds)

    def stray_control(self, count: int) -> int:
        """Send ``count`` replies to requests the daemon never made, on the control socket."""
        control = _host().control
        packet = p.encode(p.Pong(), 0x7FFF_FFF0)
        sent = 0
        for _ in range(count):
            try:
                control.send(packet, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            sent += 1
        return sent

    def sleep(self, seconds: float) -> None:
        """Block the loop (no beating thread) for ``seconds``."""
        time.sleep(seconds)
