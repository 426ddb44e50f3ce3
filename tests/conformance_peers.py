"""Deliberately broken peers for the conformance kit's own tests (tests/test_conformance.py).

``python tests/conformance_peers.py silent``: a worker that never answers LOAD.
``python tests/conformance_peers.py stubborn``: ipad's worker host, deaf to SHUTDOWN
(it still exits on control EOF, SIGTERM and its parent's death).
``python tests/conformance_peers.py mute``: ipad's worker host that answers LOAD, then never
answers OPEN_INSTANCE.
``python tests/conformance_peers.py noisy``: ipad's worker host that, once loaded, floods
its control socket with INSTANCE_CLOSED for instances nobody opened, writes
without end on stderr, and leaves a process of its own session behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types

from ipad.protocol import wire
from ipad.worker import host


class _NeverSent:
    """Stands for SHUTDOWN in the stubborn host: no message is one, so none is obeyed."""


def stubborn() -> int:
    """Serve as ipad's worker host does, but ignore SHUTDOWN."""
    host.p = types.SimpleNamespace(**{**vars(wire), "Shutdown": _NeverSent})  # type: ignore[attr-defined,assignment]
    return host.main(sys.argv[2:])


def noisy() -> int:
    """Serve as ipad's worker host does, but misbehave in every way the kit must survive."""
    if os.fork() == 0:  # an escapee: its own session, so killing the worker's group misses it
        os.setsid()
        time.sleep(3600)
        os._exit(0)
    real_load = host.WorkerHost._load

    def load(self: host.WorkerHost, load: wire.Load, frame: wire.Frame) -> None:
        real_load(self, load, frame)
        for instance_id in range(10_000, 10_200):  # a burst of closes nobody asked for
            with contextlib.suppress(OSError):
                self.control.send(wire.encode(wire.InstanceClosed(instance_id, "x" * 1000)))
        line = "noise " * 1000 + "\n"
        for _ in range(200):  # 1.2 MB on stderr
            sys.stderr.write(line)
        sys.stderr.flush()

    host.WorkerHost._load = load  # type: ignore[method-assign]
    return host.main(sys.argv[2:])


def mute() -> int:
    """Serve as ipad's worker host does, but take every OPEN_INSTANCE in silence."""

    def open_instance(self: host.WorkerHost, message: wire.OpenInstance, frame: wire.Frame) -> None:
        frame.close_fds()

    host.WorkerHost._open_instance = open_instance  # type: ignore[method-assign]
    return host.main(sys.argv[2:])


def silent() -> int:
    """Hold the control socket (fd 3) and answer nothing, for far longer than any start timeout."""
    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit({"silent": silent, "stubborn": stubborn, "noisy": noisy, "mute": mute}[sys.argv[1]]())
