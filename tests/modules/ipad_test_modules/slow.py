"""A module that takes far longer to load than any start timeout."""

from __future__ import annotations

import time

from ipad.ipa import IPAModule

time.sleep(60)


class Slow(IPAModule):
    """Never reached in time."""
