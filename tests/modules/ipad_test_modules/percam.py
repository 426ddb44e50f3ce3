"""A module for isolation per proxy: each instance is one camera, and any one can crash.

``set_camera`` is a setup call, so a test sees it replayed on a new worker;
``crash`` ends the worker the way a module bug does (an abort, not a raise);
``slow`` records its interval on CLOCK_MONOTONIC, which every process of the
machine shares, so a test proves two calls overlapped without timing them.
"""

from __future__ import annotations

import os
import signal
import time

from ipad.ipa import IPAModule, ModuleContext, setup

__version__ = "1.0.0"


class PerCamera(IPAModule):
    """The camera's name, set by ``set_camera``, and methods that show which worker runs."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        self._camera = ""

    @setup
    def set_camera(self, camera: str) -> None:
        """Remember the camera this instance serves (replayed after a crash)."""
        self._camera = camera

    def camera(self) -> str:
        """The camera ``set_camera`` set."""
        return self._camera

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def crash(self) -> None:
        """Abort the worker, as a module bug would (SIGABRT: no reply is sent)."""
        os.kill(os.getpid(), signal.SIGABRT)

    def slow(self, seconds: float) -> list[float]:
        """Sleep ``seconds`` (at most 5); return [start, end] on CLOCK_MONOTONIC."""
        start = time.monotonic()
        time.sleep(min(max(seconds, 0.0), 5.0))
        return [start, time.monotonic()]
