"""A module whose version string is nearly as large as a packet: READY carries all of it."""

from __future__ import annotations

from ipad.ipa import IPAModule

__version__ = "1." + "9" * 261_000


class BigVersion(IPAModule):
    """Nothing but its version."""

    def ping(self) -> str:
        """Answer."""
        return "pong"
