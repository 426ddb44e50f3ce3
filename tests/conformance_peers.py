"""Deliberately broken peers for the conformance kit's own tests (tests/test_conformance.py).

``python tests/conformance_peers.py silent``: a worker that never answers LOAD.
``python tests/conformance_peers.py stubborn``: ipad's worker host, deaf to SHUTDOWN
(it still exits on control EOF, SIGTERM and its parent's death).
"""

from __future__ import annotations

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


def silent() -> int:
    """Hold the control socket (fd 3) and answer nothing, for far longer than any start timeout."""
    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit({"silent": silent, "stubborn": stubborn}[sys.argv[1]]())
