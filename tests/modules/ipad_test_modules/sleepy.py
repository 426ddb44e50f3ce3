"""A module whose load takes as long as its tuning file says, and whose calls can nap.

It puts a daemon in the states that take time: a module starting, a standby
loading, a reload waiting for a module, a call in flight.

Tuning keys (all optional):
  load_seconds = 30.0        -- the worker's load (its probe instance, id 0) sleeps this long
  slow_if_exists = "/path"   -- sleep only while that file exists (without it: always)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ipad.ipa import IPAModule, ModuleContext

__version__ = "1.0.0"


class Sleepy(IPAModule):
    """Slow to load on demand; ``nap`` is a call that stays in flight."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        seconds = float(context.tuning.get("load_seconds", 0.0))
        flag = context.tuning.get("slow_if_exists")
        loading = context.instance_id == 0  # the host's probe instance, made by LOAD
        if loading and seconds > 0 and (not isinstance(flag, str) or Path(flag).exists()):
            time.sleep(seconds)

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def nap(self, seconds: float, mark: str) -> float:
        """Create the file ``mark`` (the call has begun), then sleep ``seconds``."""
        Path(mark).write_text(str(os.getpid()))
        time.sleep(seconds)
        return seconds
