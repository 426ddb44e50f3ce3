"""A module that loads, says READY, and kills its worker a few ms later: every start, forever.

The crash loop a restart policy must still contain once it forgives workers
that served: this one never serves (it dies within ``die_after`` of loading,
as a standby too).

Tuning keys (all optional):
  die_after = 0.02   -- seconds from its load to the worker's death (SIGKILL of itself)
"""

from __future__ import annotations

import os
import signal
import threading

from ipad.ipa import IPAModule, ModuleContext

__version__ = "1.0.0"

#: Whether this worker's death is set already (every instance runs __init__; one timer will do).
_armed = False


class Fleeting(IPAModule):
    """Dies ``die_after`` seconds after its worker loaded it."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        global _armed  # noqa: PLW0603 - one death per worker process, whatever the instances
        if not _armed:
            _armed = True
            delay = float(context.tuning.get("die_after", 0.02))
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()

    def ping(self) -> str:
        """Answer, while it lives."""
        return "pong"
