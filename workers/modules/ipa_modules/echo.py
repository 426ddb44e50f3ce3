"""A diagnostic module for health checks, tests and benchmarks.

Every method proves one thing about the path from a client to a worker and
back: ``echo`` a round trip, ``sleep`` a slow (or, beyond the heartbeat
timeout, hung-looking) call, ``count`` that instances keep separate state,
``fail`` error replies, ``emit`` events, ``checksum`` buffer passing, ``pid``
which process serves the instance (so a test can kill it) and ``label`` which
tuning file the worker was given.

Tuning keys (all optional; see ``workers/tuning/echo/uncalibrated.toml``):

- ``label`` (string, ``""``): returned by ``label()``, so a test can tell which
  tuning file reached the worker.
"""

from __future__ import annotations

#: The module version the worker host reports; equal to the manifest's `version`.
__version__ = "1.0.0"

import math
import os
import time
import zlib
from typing import Any

import attrs

from ipad.ipa import Buffer, IPAModule, ModuleContext
from ipad.tuning import Text, read_tuning

#: The longest ``sleep`` accepted, in seconds.
MAX_SLEEP = 60.0

#: The tuning keys and their defaults.
TUNING = {"label": Text("")}


@attrs.frozen
class EchoReply:
    """What ``echo`` returns: the text it was given."""

    text: str


@attrs.frozen
class Checksum:
    """What ``checksum`` returns: the buffer's size in bytes and its CRC-32 (``zlib.crc32``)."""

    size: int
    crc32: int


class Echo(IPAModule):
    """Diagnostics; each instance has its own call counter."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        self._label: str = read_tuning(context.tuning, TUNING)["label"]
        self._count = 0

    def echo(self, text: str) -> EchoReply:
        """Return ``text`` unchanged."""
        return EchoReply(text)

    def sleep(self, seconds: float) -> float:
        """Block the worker for ``seconds`` (0 to 60) and return them."""
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SLEEP):
            raise ValueError(f"seconds must be between 0 and {MAX_SLEEP:g}, got {seconds!r}")
        time.sleep(seconds)
        return seconds

    def count(self) -> int:
        """How many times this instance's ``count`` was called, this call included."""
        self._count += 1
        return self._count

    def fail(self, message: str) -> None:
        """Raise RuntimeError(message), to test error replies."""
        raise RuntimeError(message)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send the event ``name`` with ``data`` to this instance's client."""
        self.context.emit(name, data)

    def checksum(self, data: Buffer) -> Checksum:
        """The size and CRC-32 of a passed buffer."""
        with data.map() as view:
            return Checksum(len(view), zlib.crc32(view))

    def pid(self) -> int:
        """The id of the worker process serving this instance."""
        return os.getpid()

    def label(self) -> str:
        """The tuning file's ``label``: which tuning the worker was given."""
        return self._label
