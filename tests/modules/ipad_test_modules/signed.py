"""A module that is signed, then changed on disk by tests/test_hostile_signing.py.

``mark`` says which code runs; ``late`` imports a submodule only when first
called (after LOAD), so a test can edit that file between verification and
import; ``pid`` says which worker answers.
"""

from __future__ import annotations

import importlib
import os

from ipad.ipa import IPAModule

__version__ = "1.0.0"

#: What the signed code answers; a tampered copy answers something else.
MARK = "signed"


class Signed(IPAModule):
    """Says which code runs and which worker runs it."""

    def mark(self) -> str:
        """The MARK of the code this worker imported."""
        return MARK

    def late(self) -> str:
        """Import a submodule now (not at LOAD) and return its MARK."""
        return str(importlib.import_module(f"{__package__}.signed_late").MARK)

    def extra(self) -> str:
        """Import a module the signature may not cover (a test adds it)."""
        return str(importlib.import_module(f"{__package__}.signed_extra").MARK)

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()
