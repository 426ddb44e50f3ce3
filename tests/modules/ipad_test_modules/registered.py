"""A module for buffers registered by id (MAP_BUFFERS): it reads, fills and holds them.

Each method answers with what it saw, so a test checks from the outside what
the worker had mapped: the bytes (a SHA-256), whether the mapping was the one
of the previous call, and the DMA_BUF_IOCTL_SYNC calls made around CPU access.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ipad.ipa import Buffer, IPAModule, setup

__version__ = "1.0.0"


class Registered(IPAModule):
    """Reads and fills registered buffers; keeps a view past unmap when asked."""

    #: Views kept on purpose past their buffer's unmap (``hold``).
    held: list[memoryview] = []  # noqa: RUF012 - per worker, on purpose

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.mappings: dict[str, int] = {}
        self.table = ""

    def digest(self, frame: Buffer) -> dict[str, Any]:
        """The buffer's SHA-256 and whether it is the mapping this parameter had last call."""
        mapping = id(getattr(frame, "_map", None))
        same = self.mappings.get(frame.name) == mapping
        self.mappings[frame.name] = mapping
        with frame.cpu_access() as view:
            sha = hashlib.sha256(view).hexdigest()
        return {"sha": sha, "same_mapping": same, "size": frame.size,
                "id": getattr(frame, "id", None), "kind": getattr(frame, "kind", None)}  # fmt: skip

    def fill(self, out: Buffer, byte: int) -> list[list[Any]]:
        """Write ``byte`` over the buffer through cpu_access; the sync calls made (dma-buf)."""
        with out.cpu_access(write=True) as view:
            view[:] = bytes([byte]) * len(view)
        return [list(s) for s in getattr(out, "syncs", ())]

    def write_input(self, frame: Buffer) -> str:
        """Ask for a writable view of a buffer registered as an input: refused, even if caught."""
        try:
            with frame.cpu_access(write=True) as view:
                view[0:4] = b"EVIL"
        except ValueError as exc:
            return f"refused: {exc}"
        return "written"

    def write_readonly_view(self, frame: Buffer) -> str:
        """Write through the read-only view of an input: Python refuses (TypeError)."""
        view = frame.map()
        try:
            view[0:4] = b"EVIL"
        except TypeError as exc:
            return f"refused: {exc}"
        return "written"

    def hold(self, frame: Buffer) -> str:
        """Keep a view of the buffer past this call, and past its unmap."""
        Registered.held.append(frame.map())
        return hashlib.sha256(Registered.held[-1]).hexdigest()

    def hold_writable(self, out: Buffer) -> int:
        """Keep a writable view of an output past this call, and past its unmap."""
        Registered.held.append(out.map(writable=True))
        return len(Registered.held[-1])

    def write_held(self, byte: int) -> int:
        """Write ``byte`` over every kept view; how many there were."""
        for view in Registered.held:
            view[:] = bytes([byte]) * len(view)
        return len(Registered.held)

    def read_held(self) -> list[str]:
        """The SHA-256 of each view kept by ``hold``: the mapping lives as long as the view."""
        return [hashlib.sha256(view).hexdigest() for view in Registered.held]

    def drop_held(self) -> int:
        """Let go of the kept views; how many there were."""
        count = len(Registered.held)
        for view in Registered.held:
            view.release()
        Registered.held.clear()
        return count

    def fds(self) -> int:
        """Descriptors the worker has open now."""
        return len(os.listdir("/proc/self/fd"))  # noqa: PTH208 - a count, no paths wanted

    @setup
    def set_table(self, table: Buffer) -> str:
        """A setup call naming a buffer: replayed after a restart, after the re-registration."""
        with table.cpu_access() as view:
            self.table = hashlib.sha256(view).hexdigest()
        return self.table

    def configured(self) -> str:
        """What ``set_table`` read: after a restart, proof the replay named the buffer again."""
        return self.table

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def crash(self) -> None:
        """End this worker at once (pid 1 of a sandbox ignores its own SIGKILL): a crash."""
        os._exit(70)
