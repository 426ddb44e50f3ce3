"""A module that fails on demand: signals, exit codes, hangs, leaked grandchildren, crash loops.

It also shows what a worker sees (its environment, its descriptors) and writes
to its stderr on request, for the tests of output relaying.

Tuning keys (all optional):
  crash_if_exists = "/path"  -- while that file exists, the module dies as it loads (crash loop)
  fail_init = true           -- init() raises
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipad.ipa import IPAModule, ModuleContext, setup

__version__ = "1.0.0"

#: Exit status of a load that crashes on purpose.
CRASH_STATUS = 7


class Faulty(IPAModule):
    """Every way a worker can go wrong, one method each."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        flag = context.tuning.get("crash_if_exists")
        if isinstance(flag, str) and Path(flag).exists():
            os._exit(CRASH_STATUS)
        self.fail_init = bool(context.tuning.get("fail_init", False))
        self.value = 0

    @setup
    def init(self, settings: Mapping[str, Any] | None = None) -> None:
        """Remember ``settings['value']``; fail if the tuning says so."""
        if self.fail_init:
            raise RuntimeError("init fails on purpose")
        self.value = int((settings or {}).get("value", 0))

    @setup
    def arm(self, marker: str) -> str:
        """Fail while ``marker`` exists: a setup call whose replay fails on demand."""
        if Path(marker).exists():
            raise RuntimeError("marker present")
        return "armed"

    def get(self) -> int:
        """The value init() was given: shows a replay after a restart."""
        return self.value

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()

    def crash(self, signum: int) -> None:
        """Die by a signal."""
        os.kill(os.getpid(), signum)

    def exit(self, code: int) -> None:
        """Exit at once with ``code``."""
        os._exit(code)

    def close_control(self, linger: float) -> None:
        """Close the worker's control socket (fd 3), then stay busy: alive, cut off from the daemon."""
        os.close(3)
        time.sleep(linger)

    def hang(self) -> None:
        """Stop answering anything, heartbeats included."""
        while True:
            time.sleep(1)

    def leak(self) -> int:
        """Leave a grandchild that left the process group (setsid, then forked again)."""
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.close(read_end)
                os.write(write_end, str(os.getpid()).encode())
                os.close(write_end)
                signal.pause()
                os._exit(0)
            os._exit(0)
        os.close(write_end)
        os.waitpid(child, 0)
        pid = int(os.read(read_end, 32))
        os.close(read_end)
        return pid

    def environ(self) -> dict[str, str]:
        """The worker's environment, as the module sees it."""
        return dict(os.environ)

    def fds(self) -> dict[int, str]:
        """The worker's open descriptors and what each refers to."""
        found = {}
        for entry in Path("/proc/self/fd").iterdir():
            try:
                found[int(entry.name)] = str(entry.readlink())
            except FileNotFoundError:
                continue  # the descriptor iterdir itself used
        return found

    def write_stderr(self, text: str, count: int = 1, stdout: bool = False) -> int:
        """Write ``text`` (plus a newline) ``count`` times to stderr, or stdout; flushed."""
        stream = sys.stdout if stdout else sys.stderr
        for n in range(count):
            stream.write(text.format(n=n) + "\n")
        stream.flush()
        return count
