"""A module that dies in the ways a crash report must say where (tests/test_e2e_crashes.py).

Some of it attacks the report itself: it blocks the signal that asks for its
stacks, closes the descriptor its stacks go to, or scribbles over its
heartbeat board before it dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
from pathlib import Path

from ipad.ipa import IPAModule, ModuleContext

__version__ = "1.0.0"

#: The heartbeat board's claim area (ipad/worker/heartbeat_board.py), as a module could learn it.
CLAIM_AT = 16


def _board_fds() -> list[int]:
    """The worker's descriptors on its heartbeat board (the faulthandler's)."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if "ipad-heartbeat" in str(entry.readlink()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class Crashy(IPAModule):
    """One way to die per method; with tuning ``segfault_at_load``, as it is loaded."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        if context.tuning.get("segfault_at_load"):
            ctypes.string_at(0)

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def segfault(self) -> None:
        """Read address 0: SIGSEGV in Python code's callee."""
        ctypes.string_at(0)

    def abort(self) -> None:
        """Die of SIGABRT, as the C library aborts."""
        os.abort()

    def spin(self) -> None:
        """Loop forever in Python: killed as hung, its stack dumped first."""
        while True:
            pass

    def spin_deaf(self) -> None:
        """Block SIGUSR1, then loop forever: no stack, yet killed within the same bound."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        while True:
            pass

    def close_dump_then_segfault(self) -> int:
        """Close the board descriptor faulthandler writes to, then segfault."""
        fds = _board_fds()
        for fd in fds:
            os.close(fd)
        ctypes.string_at(0)
        return len(fds)

    def forge_then_segfault(self, text: str) -> None:
        """Write ``text`` where faulthandler's stacks go, before them, then segfault."""
        for fd in _board_fds():
            if os.lseek(fd, 0, os.SEEK_CUR) > 0:  # faulthandler's, at the dump area
                os.write(fd, text.encode())
        ctypes.string_at(0)

    def scribble_then_segfault(self) -> None:
        """Fill the claim and the dump area with lies and terminal escapes, then segfault."""
        for fd in _board_fds():
            garbage = b"\x1b[2J\x1b]0;owned\x07" * 40
            # since (the far future), instance id, flags, a length far past the room
            os.pwrite(fd, struct.pack("=QQIH", 2**63, 2**64 - 1, 0xFFFFFFFF, 65535), CLAIM_AT)
            os.pwrite(fd, garbage, CLAIM_AT + 22)
            try:  # at faulthandler's offset, on past the area's end (its sealed size stops it)
                while os.write(fd, garbage * 200):
                    pass
            except OSError:
                pass
        ctypes.string_at(0)
