"""A module whose load takes as long as its tuning file says: slow starts, on demand.

Unlike ``slow`` (60 s at import, so never ready), the delay is read from the
tuning file at each load, so a test can make starts slow, or slower than the
start timeout, and fast again, by rewriting that file between starts.

Tuning keys (all optional):
  load_seconds = 0.5  -- the load (the host's probe instance) sleeps this long
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from ipad.ipa import IPAModule, ModuleContext, setup

__version__ = "1.0.0"


class Sluggish(IPAModule):
    """Slow to load, quick to serve."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        # Instance 0 is the probe the host builds while it loads the module: only the
        # load is slow, so proxies opened later (and spares on a standby) are not.
        if context.instance_id == 0:
            time.sleep(float(context.tuning.get("load_seconds", 0.0)))
        self.value = 0

    @setup
    def init(self, settings: Mapping[str, Any] | None = None) -> None:
        """Remember ``settings['value']``, to show a replay after a restart."""
        self.value = int((settings or {}).get("value", 0))

    def get(self) -> int:
        """The value init() was given."""
        return self.value

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()
