"""A module that answers, fails, and lies about its calls on the board the daemon reads.

The worker host keeps the module's call statistics in shared memory mapped
in the worker (ipad/worker/call_stats.py): module code can find that mapping
and write anything to it. The daemon must count what is plausible and keep
its totals monotonic whatever is written.
"""

from __future__ import annotations

import gc
import time

from ipad.ipa import IPAModule
from ipad.worker.call_stats import SLOTS, CallStats

__version__ = "1.0.0"


def _slots() -> memoryview:
    """The worker's statistics page, found as a module with no access to the host would."""
    for thing in gc.get_objects():
        if isinstance(thing, CallStats):
            return thing._slots
    raise RuntimeError("no call statistics in this worker")


class StatsLiar(IPAModule):
    """Each method is one behaviour the metrics must count, or survive."""

    def ping(self) -> str:
        """A call that succeeds at once."""
        return "pong"

    def nap(self, seconds: float) -> float:
        """A call that takes ``seconds``."""
        time.sleep(seconds)
        return seconds

    def fail(self) -> None:
        """A call that fails: a module_error."""
        raise ValueError("asked to fail")

    def lie(self, value: int) -> int:
        """Write ``value`` into every slot of the statistics (huge, or back to small)."""
        slots = _slots()
        for i in range(SLOTS):
            slots[i] = value & 0xFFFF_FFFF_FFFF_FFFF
        return SLOTS
