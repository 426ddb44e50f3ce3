"""A memory limit per worker through its cgroup: cgroup2's memory.max, or cgroup v1's.

The kernel kills a worker that goes past its limit (the OOM killer, inside the
cgroup only) and counts it (``oom_kill`` in memory.events, or in v1's
memory.oom_control): that count is how the daemon reports the crash reason
``oom`` rather than a bare SIGKILL.

cgroup2 is used when the daemon's cgroup delegates the memory controller to
its children (``memory`` in its cgroup.subtree_control): the limit is written
into the worker's own cgroup (ipad/daemon/cgroup.py) before it is forked into it.
Hybrid hosts like the CI machine keep the memory controller on a v1 hierarchy
(/sys/fs/cgroup/memory); where that is writable (root), ipad makes
``ipad.<daemon pid>/<module>.<n>`` there, and the new worker joins it itself
before it drops root (ipad/worker/sandbox.py). Anything else: no memory limit here,
which ``--check-config`` reports for a module that asks for one.

Which controller is usable is found out by ipad/config/memory_support.py, which
``--check-config`` uses too; this module sets limits and reads OOM counts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path

#: The v1 files: limit (and memory+swap, when swap accounting is on), OOM kill count.
V1_LIMIT = "memory.limit_in_bytes"
V1_SWAP_LIMIT = "memory.memsw.limit_in_bytes"
V1_OOM = "memory.oom_control"
V2_LIMIT = "memory.max"
V2_SWAP_LIMIT = "memory.swap.max"
V2_EVENTS = "memory.events"


def set_limit(cgroup: Path, limit: int, version: int) -> None:
    """Write the limit (and the same for memory plus swap, so swap is no way around it)."""
    if version == 2:
        (cgroup / V2_LIMIT).write_text(str(limit))
        with contextlib.suppress(OSError):
            (cgroup / V2_SWAP_LIMIT).write_text("0")
        return
    (cgroup / V1_LIMIT).write_text(str(limit))
    if (cgroup / V1_SWAP_LIMIT).exists():
        with contextlib.suppress(OSError):
            (cgroup / V1_SWAP_LIMIT).write_text(str(limit))


def oom_kills(cgroup: Path) -> int:
    """How many processes the kernel's OOM killer ended in that cgroup (v1 or v2)."""
    for name in (V2_EVENTS, V1_OOM):
        try:
            text = (cgroup / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


class V1MemoryCgroups:
    """The daemon's subtree in the cgroup v1 memory hierarchy: one cgroup per worker."""

    def __init__(self, parent: Path) -> None:
        self.base = parent / f"ipad.{os.getpid()}"
        self._serial = itertools.count(1)

    def open(self) -> None:
        """Make the daemon's subtree (and remove those of dead daemons)."""
        with contextlib.suppress(OSError):
            for stale in self.base.parent.glob("ipad.*"):
                suffix = stale.name.removeprefix("ipad.")
                if suffix.isdigit() and not Path(f"/proc/{suffix}").exists():
                    remove_tree(stale)
        self.base.mkdir(exist_ok=True)

    def prepare(self, module: str, limit: int) -> Path:
        """A new cgroup with the limit set, for a worker that joins it as it starts."""
        path = self.base / f"{module}.{next(self._serial)}"
        path.mkdir()
        try:
            set_limit(path, limit, 1)
        except OSError:
            path.rmdir()
            raise
        return path

    def close(self) -> None:
        """Remove the subtree at exit (every worker is gone by then)."""
        remove_tree(self.base)


def clear(path: Path) -> bool:
    """Kill what is left in a worker's v1 memory cgroup and remove it; False: not empty yet."""
    with contextlib.suppress(OSError):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def remove_tree(base: Path, wait: float = 2.0) -> None:
    """Kill what is left in a v1 subtree and remove it (at exit: blocking is fine)."""
    children: list[Path] = []
    with contextlib.suppress(OSError):
        children = [child for child in base.iterdir() if child.is_dir()]
    deadline = time.monotonic() + wait
    for child in children:
        while not clear(child) and time.monotonic() < deadline:
            time.sleep(0.005)
    with contextlib.suppress(OSError):
        base.rmdir()
