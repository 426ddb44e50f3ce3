"""A hostile module that stalls its worker while keeping up every sign of life.

It reaches into the worker host that runs it (found among the live objects,
as any module can) to do what ipad's own code would never do: beat the
heartbeat board from a thread of its own while a call blocks the main loop,
stop reading its control socket, stop reading its channel, or answer its
control socket with garbage. Each attack must harm only its own worker and
the clients of this module, who have their deadlines.

Tuning keys (all optional):
  slow_open_if_exists = "/path"  -- while that file exists, each new instance takes
  open_seconds = 30.0            -- this long to construct (OPEN_INSTANCE answered late),
                                    beating from a thread meanwhile
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

from ipad.ipa import IPAModule, ModuleContext
from ipad.worker.host import WorkerHost

__version__ = "1.0.0"


def _host() -> WorkerHost:
    """The worker host serving this module (one per worker process)."""
    hosts = [o for o in gc.get_objects() if isinstance(o, WorkerHost)]
    if len(hosts) != 1:
        raise RuntimeError(f"{len(hosts)} worker hosts in this process")
    return hosts[0]


def _beat_from_a_thread() -> None:
    """Keep the worker's heartbeat board moving from a thread, whatever its loop does."""
    beater = _host().beater
    if beater is None:
        raise RuntimeError("this worker has no heartbeat board")

    def beat() -> None:
        while True:
            beater.beat()
            time.sleep(0.05)

    threading.Thread(target=beat, daemon=True).start()


class Stuck(IPAModule):
    """Every method is an attack on its own worker's liveness, but ``pid`` and ``ping``."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        flag = context.tuning.get("slow_open_if_exists")
        if context.instance_id != 0 and isinstance(flag, str) and Path(flag).exists():
            _beat_from_a_thread()
            time.sleep(float(context.tuning.get("open_seconds", 30.0)))

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def ping(self) -> str:
        """An answer, at once."""
        return "pong"

    def block_beating(self, seconds: float, mark: str) -> None:
        """Block the main loop for ``seconds`` while a thread keeps the heartbeat moving."""
        _beat_from_a_thread()
        Path(mark).write_text(str(os.getpid()))
        time.sleep(seconds)

    def trickle(self, count: int, every: float) -> int:
        """Emit an event every ``every`` seconds, ``count`` times, then answer."""
        for i in range(count):
            self.context.emit("tick", {"i": i})
            time.sleep(every)
        return count

    def deafen(self) -> None:
        """Stop reading the control socket and every other instance's channel, for good.

        The worker never learns that those clients left, so every one of their
        releases is a CLOSE_INSTANCE into a socket nobody reads. This instance's
        calls are still answered, and the loop beats on.
        """
        host = _host()
        for fd, instance in list(host.handlers.items()):
            if instance is None or instance.module is not self:
                host.epoll.unregister(fd)
                del host.handlers[fd]

    def stop_reading(self) -> None:
        """Stop reading this instance's channel: its client's sends fill it, then wait."""
        host = _host()
        for instance in host.instances.values():
            if instance.module is self:
                host.epoll.unregister(instance.sock)
                del host.handlers[instance.sock.fileno()]

    def dribble(self) -> None:
        """Send the daemon one byte at a time on the control socket: not a message."""
        host = _host()
        for byte in b"IP\x01":
            host.control.send(bytes([byte]))
