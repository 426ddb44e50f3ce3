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
import time

from ipad._worker_host import WorkerHost
from ipad.ipa import IPAModule, ModuleContext

__version__ = "1.0.0"

#: A standby's heartbeat pace, or slower (ipad/_supervisor.py STANDBY_BEAT).
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

    def sleep(self, seconds: float) -> None:
        """Block the loop (no beating thread) for ``seconds``."""
        time.sleep(seconds)
